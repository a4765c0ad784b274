"""NVIDIA safetensors <-> Orbax checkpoint conversion (see the converter issue)."""
