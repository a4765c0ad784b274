"""Block attention: a query block over (valid cache prefix ++ its own K/V), causal or
bidirectional within the block, and the training ``block_diff`` layout. See ``api``."""

from pallas_kernels.block_attention.api import IMPLEMENTATIONS, block_attention
from pallas_kernels.block_attention.masks import BlockDiffMask, BlockSparseInfo, CacheBlockMask
from pallas_kernels.block_attention.reference import (block_attention_reference, block_diff_attention_reference,
                                                      masked_attention_reference)

__all__ = ["IMPLEMENTATIONS", "block_attention", "BlockDiffMask", "BlockSparseInfo", "CacheBlockMask",
           "block_attention_reference", "block_diff_attention_reference", "masked_attention_reference"]
