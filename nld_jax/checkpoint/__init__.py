"""Checkpoint I/O: NVIDIA's HF safetensors layout (:mod:`.hf`), nld-jax's converted Orbax layout
(:mod:`.orbax`) and the JSON files beside them (:mod:`.directory`); readers return trees. Every
file is opened through :class:`.files.CheckpointFiles` (the one trust rule); hub repository ids
resolve through :mod:`.hub`."""

from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.checkpoint.files import CheckpointFiles
from nld_jax.checkpoint.hf import HFCheckpoint, read_hf_lora, read_hf_params
from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors

__all__ = ["CheckpointError", "CheckpointFiles", "HFCheckpoint", "read_hf_params", "read_hf_lora", "SafetensorsFile",
           "write_safetensors"]
