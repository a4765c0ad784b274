"""Shared fixtures: the golden tiny checkpoint (NVIDIA's format, with outputs of NVIDIA's own
reference code in tests/data/nld-tiny/golden) and a persistent compilation cache."""

from __future__ import annotations

import json
import os
import pathlib

import jax
import pytest

# Eight CPU devices in the test process itself, so that sharded runs (meshes of up to 8) are
# checked in-process; single-device tests run on the first one, as before. It must be set
# before JAX starts its backends, i.e. here, before any test touches JAX.
jax.config.update("jax_num_cpu_devices", 8)

# The tests compile many small programs (one per mode, bucket and mesh); with the library's
# default bound of 24, every eviction also clears JAX's tracing caches, which made the suite
# retrace ~100 times. The tiny models' programs are small: hold them all. (The eviction tests
# set their own bound.)
from nld_jax.programs import PROGRAMS  # noqa: E402

PROGRAMS.max_entries = 512

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "data" / "nld-tiny"

# Compiled programs survive between test runs (CI sets the same variables in .ci/run).
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", str(ROOT / ".jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    return GOLDEN_DIR


@pytest.fixture(scope="session")
def cases() -> dict:
    with open(GOLDEN_DIR / "golden" / "cases.json") as f:
        return json.load(f)


@pytest.fixture(scope="session")
def tiny():
    import nld_jax

    return nld_jax.load(GOLDEN_DIR, dtype="float32")
