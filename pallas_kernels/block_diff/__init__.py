"""Training attention over the ``block_diff`` layout ``[noisy | clean]`` (forward and backward)."""

from pallas_kernels.block_diff.api import IMPLEMENTATIONS, block_diff_attention, resolve_implementation
from pallas_kernels.block_diff.mask import BlockDiffMask, block_diff_mask, block_diff_visible
from pallas_kernels.block_diff.reference import block_diff_attention_xla

__all__ = ["IMPLEMENTATIONS", "BlockDiffMask", "block_diff_attention", "block_diff_attention_xla",
           "block_diff_mask", "block_diff_visible", "resolve_implementation"]
