"""The fused greedy LM head: argmax and its softmax probability without the logits in memory."""

from pallas_kernels.greedy_head.api import IMPLEMENTATIONS, greedy_head, resolve_implementation
from pallas_kernels.greedy_head.reference import greedy_head_xla

__all__ = ["IMPLEMENTATIONS", "greedy_head", "greedy_head_xla", "resolve_implementation"]
