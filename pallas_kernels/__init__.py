"""Pallas kernels for NLD attention (see the Pallas kernels issue); each op folder holds a
pure-jnp reference, the kernels and an ``api`` that dispatches by backend."""
