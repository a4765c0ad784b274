"""Pallas kernels for NLD's hot ops, one folder per op.

* :mod:`pallas_kernels.block_attention`: a query block over (cached prefix ++ the block's own
  K/V), causal or bidirectional within the block; and the training ``block_diff`` layout.
* :mod:`pallas_kernels.verify`: the fused LM head + argmax + confidence of the speculative
  verify / draft steps (no ``[..., V]`` logits in HBM).

Each folder has a pure-jnp ``reference`` (the oracle), backend kernels and an ``api`` that
dispatches by ``implementation=``. :mod:`pallas_kernels.register` plugs them into
:mod:`nld_jax.ops`; importing this package stays light (no kernel module is imported here).
"""

IMPLEMENTATIONS = (
    "pallas_tpu",  # Pallas TPU (Mosaic TPU) kernels: the default on TPU
    "pallas_triton",  # Pallas Triton kernels: the default on GPU
    "pallas_mosaic_gpu",  # Pallas Mosaic GPU (Hopper: TMA + wgmma) attention, Triton greedy head
    "pallas_interpret",  # the TPU kernels run by the Pallas interpreter (any backend; tests)
    "pallas_triton_interpret",  # the Triton kernels run by the Pallas interpreter (any backend; tests)
)

__all__ = ["IMPLEMENTATIONS"]
