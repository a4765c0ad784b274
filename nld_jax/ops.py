"""Swappable implementations of the two hot ops: block attention and the greedy LM head.

Each op has an XLA reference implementation (the numerical oracle) and a registry that kernels
(``pallas_kernels``) add themselves to. ``implementation="auto"`` picks the first kernel
registered for the current backend and falls back to XLA, so CPU always runs the reference.
"""

from __future__ import annotations

import importlib
from typing import Callable

import jax

__all__ = ["OpRegistry", "ATTENTION", "GREEDY_HEAD"]

_KERNEL_PLUGINS = ("pallas_kernels.register",)
_plugins_loaded = False


def _load_plugins() -> None:
    # Kernels register on import; importing lazily keeps `import nld_jax` light and lets the
    # library work where pallas_kernels is absent.
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for module in _KERNEL_PLUGINS:
        try:
            importlib.import_module(module)
        except ImportError:
            pass


class OpRegistry:
    def __init__(self, name: str, reference: Callable):
        self.name = name
        self._impls: dict[str, Callable] = {"xla": reference}
        self._auto: dict[str, list[str]] = {}

    def register(self, impl_name: str, fn: Callable, auto_for: tuple[str, ...] = ()) -> None:
        """Add ``fn`` as ``implementation=impl_name``; make it the default on ``auto_for`` backends."""
        self._impls[impl_name] = fn
        for platform in auto_for:
            order = self._auto.setdefault(platform, [])
            if impl_name not in order:
                order.insert(0, impl_name)

    def names(self) -> list[str]:
        _load_plugins()
        return sorted(self._impls)

    def resolve(self, implementation: str = "auto") -> Callable:
        if implementation == "xla":
            return self._impls["xla"]
        _load_plugins()
        if implementation == "auto":
            for name in self._auto.get(jax.default_backend(), []):
                return self._impls[name]
            return self._impls["xla"]
        try:
            return self._impls[implementation]
        except KeyError:
            raise ValueError(f"unknown {self.name} implementation {implementation!r}; "
                             f"available: {self.names()} or 'auto'") from None


def _attention_reference(*args, **kwargs):
    from nld_jax.attention import attention_xla

    return attention_xla(*args, **kwargs)


def _greedy_head_reference(*args, **kwargs):
    from nld_jax.model import greedy_head_xla

    return greedy_head_xla(*args, **kwargs)


ATTENTION = OpRegistry("attention", _attention_reference)
GREEDY_HEAD = OpRegistry("greedy_head", _greedy_head_reference)
