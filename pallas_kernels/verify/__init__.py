"""The speculative verify pass: fused greedy LM head (+ causal block attention). See ``api``."""

from pallas_kernels.verify.api import IMPLEMENTATIONS, greedy_head, verify_attention, verify_greedy
from pallas_kernels.verify.reference import (accepted_length_reference, greedy_head_reference,
                                             verify_greedy_reference)

__all__ = ["IMPLEMENTATIONS", "greedy_head", "verify_attention", "verify_greedy", "greedy_head_reference",
           "accepted_length_reference", "verify_greedy_reference"]
