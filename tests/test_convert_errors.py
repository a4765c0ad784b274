"""Every malformed input gets an error that names what is wrong, and leaves nothing behind.

Each case builds a small source, converts it into an empty output directory and checks the
exception and its message, then that the output directory is still empty (no destination,
no temporary directory).
"""

from __future__ import annotations

import json
import os
import pathlib
import struct

import numpy as np
import pytest

from nld_jax.checkpoint.hf import CheckpointError
from nld_jax.config import ConfigError, NLDConfig, RopeConfig, config_to_hf

from checkpoints_convert import convert_hf_to_orbax, convert_orbax_to_hf
from checkpoints_convert.cli import main
from checkpoints_convert.testing import hf_tensors, write_hf_checkpoint

TINY = pathlib.Path(__file__).resolve().parent / "data" / "nld-tiny"
CFG = NLDConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                rope=RopeConfig(theta=1e4, factor=2.0, original_max_position_embeddings=32), mask_token_id=3)
KEY = "encoder.layers.1.mlp.up_proj.weight"


def _params():
    import jax
    import jax.numpy as jnp

    from nld_jax.params import init_params

    return init_params(CFG, jax.random.PRNGKey(0), jnp.bfloat16)


@pytest.fixture(scope="module")
def good_tensors():
    return hf_tensors(CFG, _params())


def _source(tmp_path, tensors, **kw) -> str:
    return write_hf_checkpoint(str(tmp_path / "src"), CFG, None, tensors=tensors, **kw)


def _assert_empty(out_dir):
    assert os.listdir(out_dir) == [], os.listdir(out_dir)


BAD_TENSORS = {
    "unknown": (lambda t: {**t, "encoder.layers.0.self_attn.q_norm.weight": np.ones(8, np.float32)},
                "encoder.layers.0.self_attn.q_norm.weight"),
    "missing": (lambda t: {k: v for k, v in t.items() if k != KEY}, KEY),
    "shape": (lambda t: {**t, KEY: np.zeros((31, 16), t[KEY].dtype)}, KEY),
    "dtype": (lambda t: {**t, KEY: np.zeros((32, 16), np.int32)}, KEY),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensor_set_is_refused_by_name(tmp_path, good_tensors, case):
    make, key = BAD_TENSORS[case]
    src = _source(tmp_path, make(good_tensors), num_shards=2)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        convert_hf_to_orbax(src, out / "dst", progress=False)
    _assert_empty(out)


def test_tensor_in_two_shards_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors, num_shards=2)
    shard = os.path.join(src, "model-00002-of-00002.safetensors")
    first = os.path.join(src, "model-00001-of-00002.safetensors")
    from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors

    st = SafetensorsFile(shard)
    extra = {k: np.array(st.get(k)) for k in st.keys()}
    st.close()
    first_st = SafetensorsFile(first)
    moved = first_st.keys()[0]
    extra[moved] = np.array(first_st.get(moved))  # now in both shards
    first_st.close()
    write_safetensors(shard, extra)
    with pytest.raises(CheckpointError, match=moved.replace(".", r"\.")):
        convert_hf_to_orbax(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()


def test_tensor_listed_twice_in_index_or_header_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors, num_shards=2)
    index = os.path.join(src, "model.safetensors.index.json")
    text = open(index).read()
    name = json.load(open(index))["weight_map"][KEY]
    open(index, "w").write(text.replace('"weight_map": {', f'"weight_map": {{"{KEY}": "{name}", ', 1))
    with pytest.raises(CheckpointError, match="listed twice"):
        convert_hf_to_orbax(src, tmp_path / "dst", progress=False)
    assert not (tmp_path / "dst").exists()

    # A safetensors header naming one tensor twice (json.load would silently keep the last).
    single = _source(tmp_path / "b", {"encoder.norm.weight": np.ones(16, np.float32)})
    path = os.path.join(single, "model.safetensors")
    header = b'{"encoder.norm.weight":{"dtype":"F32","shape":[16],"data_offsets":[0,64]},' \
             b'"encoder.norm.weight":{"dtype":"F32","shape":[16],"data_offsets":[0,64]}}'
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(64))
    with pytest.raises(CheckpointError, match="listed twice"):
        convert_hf_to_orbax(single, tmp_path / "dst", progress=False)


def test_unknown_config_field_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors, config_json={**config_to_hf(CFG), "num_experts": 8})
    with pytest.raises(ConfigError, match="num_experts"):
        convert_hf_to_orbax(src, tmp_path / "out" / "dst", progress=False)
    assert not (tmp_path / "out").exists()  # the parent we would have created is gone too


def test_pickle_sources_are_never_unpickled(tmp_path):
    import pickle

    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config_to_hf(CFG)))
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Evil()))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match="pickle"):
        convert_hf_to_orbax(src, out / "dst", progress=False)
    with pytest.raises(CheckpointError, match="never unpickles"):
        convert_hf_to_orbax(src / "pytorch_model.bin", out / "dst", progress=False)
    (src / "model.pt").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError, match="pickle"):
        convert_hf_to_orbax(src / "model.pt", out / "dst", progress=False)
    assert not marker.exists()
    _assert_empty(out)


def test_bad_lora_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors)
    lora = os.path.join(src, "linear_spec_lora")
    os.makedirs(lora)
    with open(os.path.join(lora, "adapter_config.json"), "w") as f:
        json.dump({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "o_proj"]}, f)
    with pytest.raises(CheckpointError, match="target_modules"):
        convert_hf_to_orbax(src, tmp_path / "dst", progress=False)
    with open(os.path.join(lora, "adapter_config.json"), "w") as f:
        json.dump({"r": 4, "lora_alpha": 8, "target_modules": ["o_proj"]}, f)
    open(os.path.join(lora, "adapter_model.bin"), "wb").write(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError, match="unpickles"):
        convert_hf_to_orbax(src, tmp_path / "dst", progress=False)
    # --no-lora converts the base model and never looks at the adapter
    convert_hf_to_orbax(src, tmp_path / "dst", lora=False, progress=False)
    assert not (tmp_path / "dst" / "lora").exists()


def test_existing_destination_needs_overwrite(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert_hf_to_orbax(src, dst, progress=False)
    assert os.listdir(dst) == ["keep.txt"]
    convert_hf_to_orbax(src, dst, overwrite=True, progress=False)
    assert (dst / "params").is_dir() and not (dst / "keep.txt").exists()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []
    with pytest.raises(ValueError, match="contains the source"):
        convert_hf_to_orbax(src, src, overwrite=True, progress=False)
    assert os.path.exists(os.path.join(src, "model.safetensors"))


def test_failure_midway_leaves_nothing_and_keeps_old_destination(tmp_path, good_tensors, monkeypatch):
    from checkpoints_convert.orbax_io import ItemWriter

    src = _source(tmp_path, good_tensors, num_shards=2)
    out = tmp_path / "out"
    out.mkdir()
    real = ItemWriter.write_slot
    calls = []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            raise OSError("disk full (simulated)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ItemWriter, "write_slot", failing)
    with pytest.raises(OSError, match="simulated"):
        convert_hf_to_orbax(src, out / "dst", progress=False)
    _assert_empty(out)
    (out / "dst").mkdir()
    (out / "dst" / "old.txt").write_text("old")
    calls.clear()
    with pytest.raises(OSError, match="simulated"):
        convert_hf_to_orbax(src, out / "dst", overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == ["dst"] and os.listdir(out / "dst") == ["old.txt"]


def test_truncated_shard_is_refused(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors)
    path = os.path.join(src, "model.safetensors")
    os.truncate(path, os.path.getsize(path) - 10)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="inconsistent offsets"):
        convert_hf_to_orbax(src, out / "dst", progress=False)
    _assert_empty(out)


def test_reverse_refuses_a_damaged_orbax_checkpoint(tmp_path, good_tensors):
    src = _source(tmp_path, good_tensors)
    convert_hf_to_orbax(src, tmp_path / "orbax", progress=False)
    meta_path = tmp_path / "orbax" / "params" / "_METADATA"
    meta = json.loads(meta_path.read_text())
    out = tmp_path / "out"
    out.mkdir()
    damaged = dict(meta, tree_metadata={k: v for k, v in meta["tree_metadata"].items() if "'norm'" not in k})
    meta_path.write_text(json.dumps(damaged))
    with pytest.raises(CheckpointError, match="missing array.*'norm'"):
        convert_orbax_to_hf(tmp_path / "orbax", out / "hf", progress=False)
    meta_path.write_text(json.dumps(meta))
    zarray = tmp_path / "orbax" / "params" / "norm" / ".zarray"
    z = json.loads(zarray.read_text())
    zarray.write_text(json.dumps(dict(z, shape=[17], chunks=[17])))
    with pytest.raises(CheckpointError, match="'norm' has shape"):
        convert_orbax_to_hf(tmp_path / "orbax", out / "hf", progress=False)
    with pytest.raises(CheckpointError, match="nld_metadata.json"):
        convert_orbax_to_hf(TINY, out / "hf", progress=False)
    _assert_empty(out)


def test_cli_reports_errors_with_exit_code(tmp_path, good_tensors, capsys):
    src = _source(tmp_path, {k: v for k, v in good_tensors.items() if k != KEY})
    assert main([src, str(tmp_path / "dst"), "--no-progress"]) == 1
    assert KEY in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0


def test_sigterm_midway_leaves_nothing(tmp_path, good_tensors):
    """A killed conversion (SIGTERM) removes its temporary directory; a SIGKILLed one's is
    removed by the next run for the same destination."""
    import signal
    import subprocess
    import sys
    import time

    src = _source(tmp_path, good_tensors)
    out = tmp_path / "out"
    out.mkdir()
    stale = out / ".dst.nld-convert-tmp.999999999.dead"  # a pid that cannot exist
    stale.mkdir()
    script = ("import time, sys\n"
              "from checkpoints_convert.orbax_io import ItemWriter\n"
              "real = ItemWriter.write_slot\n"
              "def slow(*a, **k):\n"
              "    time.sleep(0.2)\n"
              "    return real(*a, **k)\n"
              "ItemWriter.write_slot = slow\n"
              "from checkpoints_convert.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    root = pathlib.Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", script, src, str(out / "dst"), "--no-progress"],
                            env=dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".nld-convert-tmp." in n and "dead" not in n for n in os.listdir(out)):
        time.sleep(0.05)
    assert not stale.exists()  # cleaned up by the run that started
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    _assert_empty(out)
