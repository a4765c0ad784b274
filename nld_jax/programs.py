"""The one cache of compiled programs behind ``generate``, ``forward`` and ``block_logits``.

A program is compiled ahead of time (``jax.jit(...).lower(args).compile()``), so compilation is
timed apart from generation, and it is keyed by everything that changes it: the function, its
static arguments (config, options, runtime: kernels, mesh and rules), and every argument's
tree structure, shapes, dtypes and shardings. The cache is LRU-bounded, and the bound is real
in memory, not only in entries:

* each program is compiled from its own jitted function object, which JAX's compilation caches
  hold only weakly, and an entry keeps only the compiled executable, so evicting an entry frees
  it (``tests/test_requests.py`` checks it with weak references and the backend's live
  executables);
* tracing a program also fills JAX's process-wide tracing caches (jaxprs of every inner
  ``jnp`` call, keyed by shape, up to 4096 entries each): 1-8 MiB per new request shape, for
  good, even once the program is gone. So an eviction also calls ``jax.clear_caches()``
  (``release_jax_caches``, on by default). The programs held here are compiled already and keep
  working; other jitted functions of the process retrace on their next call (the persistent
  compilation cache, when enabled, spares them the XLA compile). Evictions only happen once
  ``max_entries`` distinct programs are in use, when every miss costs a compile anyway.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
from typing import Any, Callable

import jax

__all__ = ["ProgramCache", "PROGRAMS", "signature"]


def signature(tree) -> tuple:
    """Tree structure + (shape, dtype, sharding) of every leaf: what a compiled program is specialised on."""
    leaves, treedef = jax.tree.flatten(tree)

    def leaf(x):
        sharding = getattr(x, "sharding", None)
        return (tuple(x.shape), str(x.dtype), sharding)

    return treedef, tuple(leaf(x) for x in leaves)


class ProgramCache:
    def __init__(self, max_entries: int = 24, release_jax_caches: bool = True):
        if not isinstance(max_entries, int) or isinstance(max_entries, bool) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        self.max_entries = max_entries
        self.release_jax_caches = release_jax_caches
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compilations = 0  # programs compiled so far (tests and benchmarks read it)
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
        if self.release_jax_caches:
            jax.clear_caches()

    def get(self, fn: Callable, args: tuple, *, static: dict[str, Any] | None = None, in_shardings=None,
            out_shardings=None, donate_argnums: tuple[int, ...] = ()) -> tuple[Any, float]:
        """``(compiled, compile_seconds)`` of ``fn(*args, **static)``; 0 seconds on a hit."""
        static = dict(static or {})
        key = (fn, tuple(sorted(static.items(), key=lambda kv: kv[0])), signature(args), in_shardings is not None,
               _shardings_key(in_shardings), _shardings_key(out_shardings), donate_argnums)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key], 0.0
        start = time.perf_counter()
        kwargs = {}
        if in_shardings is not None:
            kwargs["in_shardings"] = in_shardings
        if out_shardings is not None:
            kwargs["out_shardings"] = out_shardings
        jitted = jax.jit(functools.partial(fn, **static), donate_argnums=donate_argnums, **kwargs)
        compiled = jitted.lower(*args).compile()
        seconds = time.perf_counter() - start
        with self._lock:
            self._entries[key] = compiled
            self.compilations += 1
            evicted = 0
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                evicted += 1
            self.evictions += evicted
        if evicted and self.release_jax_caches:
            jax.clear_caches()  # see the module docstring: what tracing left behind, per shape
        return compiled, seconds


def _shardings_key(tree):
    if tree is None:
        return None
    leaves, treedef = jax.tree.flatten(tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return treedef, tuple(leaves)


PROGRAMS = ProgramCache()
