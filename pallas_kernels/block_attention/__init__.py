"""Decode block attention: a block of queries over the KV cache prefix and the block's own keys."""

from pallas_kernels.block_attention.api import IMPLEMENTATIONS, block_attention, resolve_implementation
from pallas_kernels.block_attention.pattern import BlockPattern
from pallas_kernels.block_attention.reference import block_attention_xla, gqa_rows, gqa_unrows

__all__ = ["IMPLEMENTATIONS", "BlockPattern", "block_attention", "block_attention_xla", "resolve_implementation",
           "gqa_rows", "gqa_unrows"]
