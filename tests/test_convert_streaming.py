"""The streaming machinery: layout views, chunk walks, blocked copies, chunk shapes, bounded memory,
and the finiteness check every streamed chunk goes through."""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import nld_jax
from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from nld_jax.config import PRESETS
from nld_jax.params import lora_specs, param_specs

from checkpoints_convert import convert_hf_to_orbax, convert_orbax_to_hf
from checkpoints_convert.orbax_io import chunk_shape
from checkpoints_convert.streaming import FiniteCheck, chunk_blocks, copy_blocked, first_non_finite
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


_RSS_CAP_MB = 600


def test_config_claiming_ten_million_layers_is_refused_in_bounded_memory(tmp_path):
    """Nothing config-sized (key maps, ledgers, writers) is built before the source's tensors are
    compared with config.json: a config claiming 10^7 layers once grew nld-convert past 10 GB.
    The child is killed as soon as its peak RSS passes the cap, so a regression fails fast."""
    import json
    import shutil
    import time

    src = pathlib.Path(shutil.copytree(TINY, tmp_path / "src", ignore=shutil.ignore_patterns("golden")))
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10_000_000}))
    proc = subprocess.Popen([sys.executable, "-m", "checkpoints_convert", str(src), str(tmp_path / "dst"),
                             "--no-progress"], env=dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak_mb, deadline = 0.0, time.time() + 120
    while proc.poll() is None and peak_mb <= _RSS_CAP_MB and time.time() < deadline:
        with contextlib.suppress(OSError, IndexError):
            status = open(f"/proc/{proc.pid}/status").read()
            peak_mb = max(peak_mb, int(status.split("VmHWM:")[1].split()[0]) / 1024)
        time.sleep(0.02)
    if proc.poll() is None:
        proc.kill()
    _, err = proc.communicate()
    assert peak_mb <= _RSS_CAP_MB, f"peak RSS {peak_mb:.0f} MB"
    assert proc.returncode == 1, err
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "10000000" in lines[0] and "config.json" in lines[0], lines
    assert os.listdir(tmp_path) == ["src"]


# ------------------------------------------------------------------------------------------
# Non-finite weights: refused while streaming, by tensor, layer and index
# ------------------------------------------------------------------------------------------

def test_finite_check_finds_every_non_finite_bit_pattern():
    import ml_dtypes

    for dtype in (ml_dtypes.bfloat16, np.float16, np.float32, np.float64):
        info = ml_dtypes.finfo(dtype)
        a = np.array([0, -0.0, info.max, -info.max, info.tiny, info.smallest_subnormal, 1, -1], dtype)
        assert FiniteCheck(piece_bytes=4)(a), dtype
        for bad in (np.nan, -np.nan, np.inf, -np.inf):
            b = a.copy()
            b[5] = bad
            assert FiniteCheck(piece_bytes=4).first_bad(b) == 5, (dtype, bad)
        payload = a.copy().view(f"u{a.itemsize}")  # a NaN with another payload, sign bit set
        payload[3] = np.array(-np.nan, dtype).view(payload.dtype) | 1
        assert FiniteCheck(piece_bytes=4).first_bad(payload.view(dtype)) == 3
    assert first_non_finite(np.array([[0, 1], [np.inf, 0]], np.float32)) == (1, 0)


def _tiny_copy(tmp_path) -> pathlib.Path:
    import shutil

    return pathlib.Path(shutil.copytree(TINY, tmp_path / "src", ignore=shutil.ignore_patterns("golden")))


def _plant(path: pathlib.Path, key: str, index: tuple[int, ...], value: float) -> None:
    st = SafetensorsFile(path)
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    metadata = st.metadata
    st.close()
    tensors[key][index] = value
    write_safetensors(path, tensors, metadata)


NON_FINITE = {  # case -> (file, tensor, index, value, layer text)
    "nan-in-a-layer": ("model.safetensors", "encoder.layers.1.mlp.up_proj.weight", (3, 5), np.nan, "(layer 1)"),
    "minus-inf-in-the-head": ("model.safetensors", "diffusion_head.weight", (7, 2), -np.inf, ""),
    "inf-in-the-lora": ("linear_spec_lora/adapter_model.safetensors",
                        "base_model.model.encoder.layers.0.self_attn.o_proj.lora_B.weight", (1, 1), np.inf,
                        "(layer 0)"),
}


@pytest.mark.parametrize("case", sorted(NON_FINITE))
def test_non_finite_weight_is_refused_by_name_and_nothing_changes(tmp_path, capsys, case):
    from checkpoints_convert.cli import main

    rel, key, index, value, layer = NON_FINITE[case]
    src = _tiny_copy(tmp_path)
    _plant(src / rel, key, index, value)
    dst = tmp_path / "out" / "dst"
    dst.mkdir(parents=True)
    (dst / "old.txt").write_text("old")
    assert main([str(src), str(dst), "--overwrite", "--no-progress"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    for part in (str(src / rel), repr(key), layer, "NaN or Inf", str(list(index))):
        assert part in line, (part, line)
    assert sorted(os.listdir(tmp_path / "out")) == ["dst"] and os.listdir(dst) == ["old.txt"]


def test_non_finite_in_a_converted_checkpoint_is_refused_by_reverse(tmp_path, capsys):
    from checkpoints_convert.cli import main

    rel, key, index, value, layer = NON_FINITE["nan-in-a-layer"]
    src = _tiny_copy(tmp_path)
    _plant(src / rel, key, index, value)
    convert_hf_to_orbax(src, tmp_path / "orbax", progress=False, check_finite=False)  # to inspect it, say
    assert main([str(tmp_path / "orbax"), str(tmp_path / "hf"), "--reverse", "--no-progress"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    for part in (str(tmp_path / "orbax" / "params"), repr(key), layer, str(list(index))):
        assert part in line, (part, line)
    assert sorted(os.listdir(tmp_path)) == ["orbax", "src"]


def test_cast_that_overflows_is_refused(tmp_path):
    """float32 beyond bfloat16's range becomes Inf in a --dtype bfloat16 conversion."""
    from nld_jax.checkpoint.hf import CheckpointError

    src = _tiny_copy(tmp_path)
    st = SafetensorsFile(src / "model.safetensors")
    tensors = {k: np.array(st.get(k)).astype(np.float32) for k in st.keys()}
    st.close()
    tensors["encoder.layers.0.self_attn.q_proj.weight"][2, 3] = 3.4e38  # finite in float32
    write_safetensors(src / "model.safetensors", tensors, {"format": "pt"})
    with pytest.raises(CheckpointError, match=r"q_proj.weight' \(layer 0\) has values beyond the range of bfloat16"):
        convert_hf_to_orbax(src, tmp_path / "dst", dtype="bfloat16", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]
    convert_hf_to_orbax(src, tmp_path / "dst", progress=False)  # float32 kept: fine
