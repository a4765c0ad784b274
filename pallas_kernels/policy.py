"""The one ``implementation="auto"`` policy of every op (block attention, block_diff attention,
greedy head).

A kernel becomes the automatic choice on a platform only once it has been validated on that
hardware: its compiled test suite passed there and the benchmark table showed it faster than
XLA (``bash benchmarks/gpu_device_check.sh`` on a GPU; the TPU equivalent on a TPU). Until then
``auto`` is XLA everywhere. No kernel has run on real hardware yet, so the table is empty; a
validation run adds ``{platform: implementation}`` entries here and nowhere else.
"""

from __future__ import annotations

import jax

__all__ = ["VALIDATED", "auto_implementation", "platform"]

VALIDATED: dict[str, dict[str, str]] = {
    "block_attention": {},
    "block_diff": {},
    "greedy_head": {},
}


def platform() -> str:
    return jax.default_backend()


def auto_implementation(op: str) -> str:
    """What ``implementation="auto"`` means for ``op`` on the current platform."""
    try:
        table = VALIDATED[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; known: {sorted(VALIDATED)}") from None
    return table.get(platform(), "xla")
