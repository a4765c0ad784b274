"""Pallas kernels for NLD's hot ops, one folder per op; a leaf package (it imports nothing of nld_jax).

* :mod:`pallas_kernels.block_attention`: a decode block of queries over the KV cache prefix and
  the block's own keys, with the block's pattern as data (:class:`~.block_attention.BlockPattern`).
* :mod:`pallas_kernels.block_diff`: the training ``block_diff`` layout, forward and backward.
* :mod:`pallas_kernels.greedy_head`: the fused LM head + argmax + confidence.

Each folder has ``reference.py`` (the ``xla`` implementation, also the kernels' oracle), backend
kernels and ``api.py``, the op's only dispatcher. What ``implementation="auto"`` means is decided
in one place for every op, :mod:`pallas_kernels.policy`.
"""

IMPLEMENTATIONS = (
    "xla",  # the XLA reference (every backend)
    "pallas_tpu",  # Pallas TPU (Mosaic TPU) kernels
    "pallas_triton",  # Pallas Triton kernels (GPU)
    "pallas_mosaic_gpu",  # Pallas Mosaic GPU (Hopper: TMA + wgmma) attention, Triton for the other ops
    "pallas_interpret",  # the TPU kernels run by the Pallas interpreter (any backend; tests)
    "pallas_triton_interpret",  # the Triton kernels run by the Pallas interpreter (any backend; tests)
)

__all__ = ["IMPLEMENTATIONS"]
