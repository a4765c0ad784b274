"""Checkpoint I/O: NVIDIA's HF safetensors layout."""

from nld_jax.checkpoint.hf import CheckpointError, HFCheckpoint, load_hf_lora, load_hf_params
from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["CheckpointError", "HFCheckpoint", "load_hf_params", "load_hf_lora", "SafetensorsFile",
           "write_safetensors"]
