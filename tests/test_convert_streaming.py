"""The streaming machinery: layout views, chunk walks, blocked copies, chunk shapes, bounded memory."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import nld_jax
from nld_jax.config import PRESETS
from nld_jax.params import lora_specs, param_specs

from checkpoints_convert import convert_hf_to_orbax, convert_orbax_to_hf
from checkpoints_convert.orbax_io import chunk_shape
from checkpoints_convert.streaming import chunk_blocks, copy_blocked
from checkpoints_convert.testing import hf_dir_tensors
from checkpoints_convert.to_hf import is_dense_layout

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "nld-tiny"


def is_view_of(view: np.ndarray, base: np.ndarray) -> bool:
    """Whether writing through ``view`` fills all of ``base`` (a transpose/reshape, not a copy)."""
    return view.size == base.size and view.flags.writeable and np.may_share_memory(view, base)


def _all_specs(config):
    return {**param_specs(config), **{f"lora.{k}": v for k, v in lora_specs(config, 128).items()}}


@pytest.mark.parametrize("name", ["3b", "14b"])
def test_layout_transforms_are_views_at_real_sizes(name):
    """``to_ours`` of a (mapped) HF tensor must be a view, or a layer would be copied whole."""
    for path, spec in _all_specs(PRESETS[name]).items():
        hf = np.empty(spec.hf_shape, np.uint16)  # never touched: no memory is committed
        view = spec.to_ours(hf)
        assert is_view_of(view, hf), path
        assert is_dense_layout(view), path  # --reverse streams it in strips, never whole
        per_layer = spec.shape[1:] if spec.stacked else spec.shape
        assert view.shape == tuple(per_layer), path


def test_chunk_blocks_cover_each_element_once_source_order_first():
    for shape, chunks, axis in [((10, 7), (3, 2), 1), ((4, 6, 5), (1, 4, 5), 1), ((9,), (9,), 0), ((3, 3), (5, 5), None)]:
        covered = np.zeros(shape, int)
        blocks = list(chunk_blocks(shape, chunks, axis))
        for idx in blocks:
            covered[idx] += 1
            assert all(sl.start % c == 0 for sl, c in zip(idx, chunks))
        assert (covered == 1).all()
        if axis is not None:  # the outer axis advances only after the others have cycled
            starts = [idx[axis].start for idx in blocks]
            assert starts == sorted(starts)
    assert list(chunk_blocks((), (), None)) == [()]


@pytest.mark.parametrize("block_bytes", [1, 64, 1 << 20])
def test_blocked_copy_matches_numpy_for_every_transform(block_bytes):
    config = nld_jax.NLDConfig(vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=6, mask_token_id=3)
    rng = np.random.default_rng(0)
    for path, spec in _all_specs(config).items():
        hf = rng.standard_normal(spec.hf_shape).astype(np.float32)
        view = spec.to_ours(hf)
        ours = np.empty(view.shape, np.float64)
        copy_blocked(ours, view, block_bytes)
        np.testing.assert_array_equal(ours, np.ascontiguousarray(view), err_msg=path)
        back = np.empty(spec.hf_shape, np.float32)  # the reverse: fill HF memory through the view
        copy_blocked(spec.to_ours(back), ours, block_bytes)
        np.testing.assert_array_equal(back, hf, err_msg=path)


def test_dense_layout_detection():
    a = np.empty((4, 6), np.uint16)
    assert is_dense_layout(a) and is_dense_layout(a.T) and is_dense_layout(a.T.reshape(2, 3, 4))
    assert not is_dense_layout(a[:, ::2]) and not is_dense_layout(a[:, :3]) and not is_dense_layout(np.empty(()))
    assert not is_dense_layout(np.lib.stride_tricks.as_strided(a, (3, 4), (2, 4)))  # overlapping


def test_chunk_shapes():
    embed = chunk_shape((131072, 3072), 2, stacked=False)
    assert embed == [2048, 1536] and np.prod(embed) * 2 <= 8 << 20
    q = chunk_shape((26, 3072, 32, 128), 2, stacked=True)
    assert q[0] == 1 and np.prod(q) * 2 <= 8 << 20
    assert chunk_shape((5, 7), 4, stacked=True) == [1, 7]
    assert chunk_shape((), 4, stacked=False) == []
    assert chunk_shape((131073,), 4, stacked=False, target_bytes=1024) == [129]  # ceil-halving: 131073 -> ... -> 257 -> 129


def test_many_small_ragged_chunks_round_trip(tmp_path):
    """Dozens of ragged chunks per tensor: still bit-exact, same logits."""
    convert_hf_to_orbax(TINY, tmp_path / "o", chunk_bytes=300, progress=False)
    convert_orbax_to_hf(tmp_path / "o", tmp_path / "h", progress=False)
    assert hf_dir_tensors(tmp_path / "h") == hf_dir_tensors(TINY)
    chunk_files = os.listdir(tmp_path / "o" / "params" / "diffusion_head")
    assert len(chunk_files) > 50  # really chunked: [64, 512] bf16 in chunks of <= 300 bytes
    ref = nld_jax.load(TINY, dtype="float32", load_tokenizer_files=False)
    out = nld_jax.load(tmp_path / "o", dtype="float32", load_tokenizer_files=False)
    tokens = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    np.testing.assert_array_equal(np.asarray(nld_jax.forward(out, tokens)), np.asarray(nld_jax.forward(ref, tokens)))


_PEAK_RSS = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
except SystemExit as e:
    assert not e.code, e.code
print([line for line in open("/proc/self/status") if line.startswith("VmHWM")][0].split()[1])
"""


def _peak_rss_mb(module: str, args: list[str], env: dict) -> float:
    """Peak RSS (VmHWM) of ``python -m module args`` (not ru_maxrss: that inherits pytest's RSS)."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, module, *args], env=env, capture_output=True,
                         text=True, check=True).stdout
    return int(out.split()[-1]) / 1024


@pytest.mark.slow
def test_peak_memory_is_about_one_tensor(tmp_path):
    """Converter RSS minus the interpreter's is below 1.5x the largest tensor (256 MiB here)."""
    from checkpoints_convert.testing import write_large_random_checkpoint

    config = nld_jax.NLDConfig(vocab_size=131072, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, head_dim=128, mask_token_id=3)
    info = write_large_random_checkpoint(str(tmp_path / "src"), config, max_shard_bytes=300 << 20, lora_rank=16)
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    base = _peak_rss_mb("checkpoints_convert.to_hf", [], env)  # the interpreter and every import
    fwd = _peak_rss_mb("checkpoints_convert", [str(tmp_path / "src"), str(tmp_path / "o"), "--no-progress"], env)
    rev = _peak_rss_mb("checkpoints_convert", [str(tmp_path / "o"), str(tmp_path / "h"), "--reverse",
                                               "--no-progress"], env)
    largest_mb = info["largest"] / 2**20
    print(f"peak RSS MiB: imports {base:.0f}, convert {fwd:.0f}, reverse {rev:.0f}; largest tensor {largest_mb:.0f}")
    assert fwd - base < 1.5 * largest_mb + 200, (base, fwd, largest_mb)
    assert rev - base < 1.5 * largest_mb + 200, (base, rev, largest_mb)
