"""A checkpoint is input from a stranger: the malformed-checkpoint corpus (built here, from the
golden tiny checkpoint, by tests/_corpus.py).

Every case asserts the exception type (CheckpointError, ConfigError or FileNotFoundError: never
a raw TypeError, KeyError, UnicodeDecodeError or JSONDecodeError) and that the message names the
file (and the tensor or field). The safetensors package is the independent oracle for headers.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import nld_jax
from nld_jax.checkpoint.directory import load_hf_config, read_generation_defaults
from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.checkpoint.files import CheckpointFiles
from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from nld_jax.config import ConfigError
from nld_jax.params import flatten_tree
from nld_jax.tokenizer import load_tokenizer

from _corpus import (HEADER_CASES, ORACLE_DISAGREES, VALID_HEADER_CASES, copy_tiny, edit_json, hub_cache,
                     read_tensors, rewrite_tensors, shard)

ROOT = pathlib.Path(__file__).resolve().parents[1]
KEY = "encoder.layers.1.mlp.up_proj.weight"


def refused(call, *names, exc=CheckpointError) -> str:
    """``call()`` raises ``exc`` whose message contains every one of ``names``; returns the message."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    for name in names:
        assert str(name) in message, (name, message)
    return message


def load(path, **kw):
    return nld_jax.load(path, **{"load_tokenizer_files": True, **kw})


def with_deadline(call, seconds: float = 30.0):
    """Run ``call`` in a thread: a read that blocks (a FIFO) fails the test instead of hanging it."""
    result: dict = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as e:  # handed to the test thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s (opened a FIFO?)"
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.fixture
def ckpt(tmp_path) -> pathlib.Path:
    return copy_tiny(tmp_path)


@pytest.fixture
def outside(tmp_path) -> pathlib.Path:
    """A directory beside the checkpoint holding valid copies of its files (so that a refusal is
    the trust rule's doing, not a missing or broken file)."""
    return copy_tiny(tmp_path, "outside")


# --------------------------------------------------------------------------------------
# Safetensors headers: one validator, the safetensors package as oracle
# --------------------------------------------------------------------------------------

def _oracle_accepts(path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
        return True
    except Exception:
        return False


@pytest.mark.parametrize("case", sorted(HEADER_CASES))
def test_malformed_header_is_refused_by_name(tmp_path, case):
    raw, pattern, tensor = HEADER_CASES[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(raw)
    message = refused(lambda: SafetensorsFile(path), path, *([repr(tensor)] if tensor else []))
    assert re.search(pattern, message), message
    assert _oracle_accepts(path) == (case in ORACLE_DISAGREES), "the safetensors package disagrees"


@pytest.mark.parametrize("case", sorted(VALID_HEADER_CASES))
def test_odd_but_valid_header_is_accepted(tmp_path, case):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(VALID_HEADER_CASES[case])
    st = SafetensorsFile(path)
    for name in st.keys():
        assert st.get(name).shape == st.shape(name)
    assert _oracle_accepts(path)


def test_malformed_header_through_load_names_the_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(HEADER_CASES["overlapping_tensors"][0])
    refused(lambda: load(ckpt), ckpt / "model.safetensors", "'b'", "overlaps")


def test_truncated_shard_is_refused(ckpt):
    path = ckpt / "model.safetensors"
    os.truncate(path, path.stat().st_size - 10)
    refused(lambda: load(ckpt), path, "truncated")


# --------------------------------------------------------------------------------------
# Names an index may give, symlinks, FIFOs
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["../outside/model.safetensors", "/etc/passwd", "ABSOLUTE", "sub/x.safetensors",
                                    "..", ""])
def test_weight_map_names_only_plain_files(ckpt, outside, target):
    weight_map = shard(ckpt)
    target = str(outside / "model.safetensors") if target == "ABSOLUTE" else target
    edit_json(ckpt / "model.safetensors.index.json", lambda index: index["weight_map"].update({KEY: target}))
    refused(lambda: load(ckpt), "model.safetensors.index.json", KEY, repr(target), "plain file name")
    assert weight_map[KEY] != target


def test_a_fifo_is_never_opened(ckpt):
    shard(ckpt)
    shard_name = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][KEY]
    (ckpt / shard_name).unlink()
    os.mkfifo(ckpt / shard_name)
    refused(lambda: with_deadline(lambda: load(ckpt)), ckpt / shard_name, "not a regular file")

    single = copy_tiny(ckpt.parent, "single")
    (single / "model.safetensors").unlink()
    os.mkfifo(single / "model.safetensors")
    refused(lambda: with_deadline(lambda: load(single)), single / "model.safetensors", "not a regular file")
    for name in ("config.json", "tokenizer.json"):  # the small files go through the same rule
        fifo = copy_tiny(ckpt.parent, f"fifo-{name}")
        (fifo / name).unlink()
        os.mkfifo(fifo / name)
        refused(lambda: with_deadline(lambda: load(fifo)), fifo / name, "not a regular file")


@pytest.mark.parametrize("name", ["model.safetensors", "linear_spec_lora", "linear_spec_lora/adapter_model.safetensors",
                                  "tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"])
def test_a_symlink_out_of_the_checkpoint_is_refused(ckpt, outside, name):
    target = outside / name
    if (ckpt / name).is_dir():
        shutil.rmtree(ckpt / name)
    else:
        (ckpt / name).unlink()
    os.symlink(target, ckpt / name)
    refused(lambda: load(ckpt), ckpt / name, "outside the checkpoint")


def test_symlinks_inside_the_checkpoint_are_followed(ckpt):
    (ckpt / "weights").mkdir()
    (ckpt / "model.safetensors").rename(ckpt / "weights" / "real.safetensors")
    os.symlink("weights/real.safetensors", ckpt / "model.safetensors")
    (ckpt / "linear_spec_lora").rename(ckpt / "lora_real")
    os.symlink("lora_real", ckpt / "linear_spec_lora")
    model = load(ckpt)
    ref = nld_jax.load(ROOT / "tests" / "data" / "nld-tiny")
    np.testing.assert_array_equal(np.asarray(model.lora["A"]), np.asarray(ref.lora["A"]))


def test_dangling_and_looping_symlinks(ckpt):
    (ckpt / "model.safetensors").unlink()
    os.symlink("nowhere.safetensors", ckpt / "model.safetensors")
    refused(lambda: load(ckpt), ckpt / "model.safetensors", "dangling", exc=FileNotFoundError)
    (ckpt / "model.safetensors").unlink()
    os.symlink("loop_b", ckpt / "model.safetensors")
    os.symlink("model.safetensors", ckpt / "loop_b")
    refused(lambda: load(ckpt), ckpt / "model.safetensors")


def test_files_rule_directly(ckpt, outside):
    files = CheckpointFiles(ckpt)
    for bad in ("../outside/config.json", "/etc/passwd", "a/../config.json", "", "a\x00b"):
        refused(lambda: files.path(bad), repr(bad))
    refused(lambda: files.path("linear_spec_lora"), "a directory")
    refused(lambda: files.read_json("model.safetensors"), ckpt / "model.safetensors", "UTF-8")


# --------------------------------------------------------------------------------------
# Index, metadata and adapter files
# --------------------------------------------------------------------------------------

INDEX_CASES = {
    "not_json": ('{"weight_map": {', "not valid JSON"),
    "not_utf8": (b'{"weight_map": {"\xff": 1}}', "UTF-8"),
    "a_list": ("[]", "JSON object"),
    "no_weight_map": ('{"metadata": {}}', "weight_map"),
    "weight_map_a_list": ('{"weight_map": []}', "weight_map"),
    "shard_name_not_str": (json.dumps({"weight_map": {KEY: 3}}), KEY),
    "key_listed_twice": ('{"weight_map": {"a": "model-00001.safetensors", "a": "model-00002.safetensors"}}',
                         "listed twice"),
    "nested_too_deeply": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(INDEX_CASES))
def test_malformed_index_is_refused(ckpt, case):
    shard(ckpt)
    text, expected = INDEX_CASES[case]
    index = ckpt / "model.safetensors.index.json"
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    refused(lambda: load(ckpt), index, expected)


def test_index_and_shards_must_agree(ckpt):
    weight_map = shard(ckpt)
    index = ckpt / "model.safetensors.index.json"
    moved = dict(weight_map, **{KEY: "model-00002.safetensors" if weight_map[KEY] != "model-00002.safetensors"
                                else "model-00001.safetensors"})
    index.write_text(json.dumps({"weight_map": moved}))
    refused(lambda: load(ckpt), index, KEY, "not there")
    fewer = {k: v for k, v in weight_map.items() if k != KEY}
    index.write_text(json.dumps({"weight_map": fewer}))
    refused(lambda: load(ckpt), index, KEY, "does not list")
    index.write_text(json.dumps({"weight_map": dict(weight_map, **{KEY: "model-00009.safetensors"})}))
    refused(lambda: load(ckpt), "model-00009.safetensors", "missing")


@pytest.mark.parametrize("content,expected", [
    ("{", "not valid JSON"), ("[]", "JSON object"), ('{"r": null, "lora_alpha": 16, "target_modules": ["o_proj"]}', "r=None"),
    ('{"r": 8.0, "lora_alpha": 16, "target_modules": ["o_proj"]}', "r=8.0"),
    ('{"r": 8, "lora_alpha": NaN, "target_modules": ["o_proj"]}', "lora_alpha"),
    ('{"r": 8, "lora_alpha": 16, "target_modules": {"o_proj": 1}}', "target_modules")])
def test_malformed_adapter_config_is_refused(ckpt, content, expected):
    path = ckpt / "linear_spec_lora" / "adapter_config.json"
    path.write_text(content)
    refused(lambda: load(ckpt), path, expected)


def test_lora_folder_that_is_a_file_is_refused(ckpt):
    shutil.rmtree(ckpt / "linear_spec_lora")
    (ckpt / "linear_spec_lora").write_text("not a folder")
    refused(lambda: load(ckpt), ckpt / "linear_spec_lora", "not a directory")


@pytest.mark.parametrize("name,content,expected", [
    ("tokenizer.json", "{", "not a valid tokenizer"), ("tokenizer_config.json", "[1]", "JSON object"),
    ("tokenizer_config.json", '{"chat_template": 5}', "chat_template"),
    ("tokenizer_config.json", '{"bos_token": 5}', "bos_token"),
    ("tokenizer_config.json", '{"add_bos_token": "yes"}', "add_bos_token"),
    ("chat_template.jinja", b"\xff\xfe", "UTF-8"), ("tokenizer.model", b"garbage", "sentencepiece")])
def test_malformed_tokenizer_files_are_refused(ckpt, name, content, expected):
    if name == "tokenizer.model":
        (ckpt / "tokenizer.json").unlink()
    if name == "chat_template.jinja":
        (ckpt / "tokenizer_config.json").write_text("{}")
    path = ckpt / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(lambda: load_tokenizer(ckpt), path, expected)


@pytest.mark.parametrize("content,expected", [("{", "not valid JSON"), ("[]", "JSON object"),
                                              ('{"block_length": 8.5}', "block_length"),
                                              ('{"threshold": NaN}', "threshold")])
def test_malformed_generation_config_is_refused(ckpt, content, expected):
    path = ckpt / "generation_config.json"
    path.write_text(content)
    refused(lambda: read_generation_defaults(ckpt), path, expected, exc=ConfigError)


# --------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------

CONFIG_CASES = {
    "num_hidden_layers_float": ({"num_hidden_layers": 8.7}, "num_hidden_layers"),
    "num_hidden_layers_integral_float": ({"num_hidden_layers": 2.0}, "num_hidden_layers"),
    "num_hidden_layers_string": ({"num_hidden_layers": "2"}, "num_hidden_layers"),
    "num_hidden_layers_bool": ({"num_hidden_layers": True}, "num_hidden_layers"),
    "num_hidden_layers_zero": ({"num_hidden_layers": 0}, "num_hidden_layers"),
    "num_hidden_layers_bomb": ({"num_hidden_layers": 10_000_000}, "num_hidden_layers"),
    "vocab_size_zero": ({"vocab_size": 0}, "vocab_size"),
    "vocab_size_too_big": ({"vocab_size": 2**25}, "vocab_size"),
    "hidden_size_null": ({"hidden_size": None}, "hidden_size"),
    "heads_not_dividing": ({"num_key_value_heads": 3}, "num_key_value_heads"),
    "head_dim_odd": ({"head_dim": 33}, "head_dim"),
    "max_positions_zero": ({"max_position_embeddings": 0}, "max_position_embeddings"),
    "rms_norm_eps_zero": ({"rms_norm_eps": 0}, "rms_norm_eps"),
    "rms_norm_eps_nan": ({"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    "rms_norm_eps_string": ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    "rope_theta_zero": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 0, "factor": 4.0}}, "rope_theta"),
    "rope_theta_one": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1, "factor": 4.0}}, "rope_theta"),
    "yarn_factor_below_one": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 0.5}}, "factor"),
    "rope_parameters_a_list": ({"rope_parameters": [["rope_theta", 1e6]]}, "rope_parameters"),
    "beta_fast_negative": ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                "beta_fast": -1}}, "beta_fast"),
    "rope_scaling_disagrees": ({"rope_scaling": {"rope_type": "yarn", "factor": "x"}}, "disagree"),
    "mask_outside_vocab": ({"mask_token_id": 512}, "mask_token_id"),
    "bos_outside_vocab": ({"bos_token_id": -1}, "bos_token_id"),
    "eos_list_with_a_string": ({"eos_token_id": [2, "x"]}, "eos_token_id"),
    "tie_not_bool": ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    "block_size_zero": ({"block_size": 0}, "block_size"),
    "model_type_a_list": ({"model_type": ["x"]}, "model_type"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_config_types_and_ranges_name_file_field_and_value(ckpt, case):
    change, field = CONFIG_CASES[case]
    edit_json(ckpt / "config.json", lambda c: c.update(change))
    value = change.get(field)
    shown = [repr(value)] if isinstance(value, (int, str)) or (isinstance(value, float) and math.isfinite(value)) else []
    refused(lambda: load(ckpt), ckpt / "config.json", field, *shown, exc=ConfigError)


@pytest.mark.parametrize("content", ["{", "[1, 2]", "\"config\"", b"\xff\xfe{}"])
def test_config_not_a_json_object(ckpt, content):
    path = ckpt / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    refused(lambda: load_hf_config(ckpt), path, exc=ConfigError)


def test_real_configs_still_load():
    for directory in (ROOT / "tests" / "data" / "nld-tiny", ROOT / "nld_jax" / "assets" / "default-model",
                      ROOT / "nld_jax" / "assets" / "stdlib-model"):
        load_hf_config(directory)


# --------------------------------------------------------------------------------------
# Memory bombs: refused before anything of that size is built
# --------------------------------------------------------------------------------------

def test_layer_count_is_compared_with_the_headers_before_expanding_keys(ckpt):
    edit_json(ckpt / "config.json", lambda c: c.update(num_hidden_layers=40))
    refused(lambda: load(ckpt), "config.json says 40 layers; the safetensors hold layers 0..1")


def test_memory_bombs_stay_small(tmp_path):
    """Peak RSS of the loading process, measured in a subprocess (VmHWM), on configs that claim
    10M layers, 1024 layers and a 2**24 x 2**16 embedding over the 2-layer tiny weights."""
    cases = {"layers_10M": {"num_hidden_layers": 10_000_000}, "layers_1024": {"num_hidden_layers": 1024},
             "embedding_4TB": {"vocab_size": 2**24, "hidden_size": 2**16, "head_dim": 32}}
    dirs = {}
    for name, change in cases.items():
        dirs[name] = str(copy_tiny(tmp_path, name))
        edit_json(pathlib.Path(dirs[name]) / "config.json", lambda c: c.update(change))
    script = textwrap.dedent(f"""
        import json, nld_jax
        def hwm():
            return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]) * 1024
        nld_jax.load({str(ROOT / "tests" / "data" / "nld-tiny")!r}, load_tokenizer_files=False)  # warm: imports, first arrays
        out = {{}}
        for name, path in {dirs!r}.items():
            before = hwm()
            try:
                nld_jax.load(path)
                out[name] = ["loaded", 0]
            except Exception as e:
                out[name] = [type(e).__name__ + ": " + str(e), hwm() - before]
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["layers_10M"][0].startswith("ConfigError") and "num_hidden_layers" in out["layers_10M"][0]
    assert "config.json says 1024 layers; the safetensors hold layers 0..1" in out["layers_1024"][0]
    assert out["embedding_4TB"][0].startswith("CheckpointError") and "shape" in out["embedding_4TB"][0]
    for name, (message, grew) in out.items():
        assert grew < 32 * 2**20, (name, grew, message)


# --------------------------------------------------------------------------------------
# Non-finite weights
# --------------------------------------------------------------------------------------

def test_nan_weight_is_refused_by_name(ckpt):
    def poison(t):
        t[KEY] = t[KEY].copy()
        t[KEY][3, 5] = np.nan
    rewrite_tensors(ckpt / "model.safetensors", poison)
    refused(lambda: load(ckpt), ckpt / "model.safetensors", KEY, "non-finite")
    refused(lambda: load(ckpt, check_finite=True, dtype="bfloat16"), KEY)
    load(ckpt, check_finite=False)  # the caller's choice


def test_inf_in_the_lora_is_refused_by_name(ckpt):
    path = ckpt / "linear_spec_lora" / "adapter_model.safetensors"
    key = sorted(read_tensors(path))[-1]
    rewrite_tensors(path, lambda t: t.update({key: np.full_like(t[key], np.inf)}))
    refused(lambda: load(ckpt), path, key, "non-finite")


def test_float32_beyond_bf16_range_is_refused_when_loaded_as_bf16(ckpt):
    rewrite_tensors(ckpt / "model.safetensors",
                    lambda t: t.update({KEY: np.full(t[KEY].shape, 3.4e38, np.float32)}))
    load(ckpt, dtype="float32")
    refused(lambda: load(ckpt, dtype="bfloat16"), KEY, "non-finite")


def test_quantized_weights_are_refused_by_dtype(ckpt):
    rewrite_tensors(ckpt / "model.safetensors", lambda t: t.update({KEY: np.zeros(t[KEY].shape, np.int8)}))
    refused(lambda: load(ckpt), ckpt / "model.safetensors", KEY, "int8")


# --------------------------------------------------------------------------------------
# What a directory is, and Orbax checkpoints
# --------------------------------------------------------------------------------------

def test_what_the_path_is(tmp_path, ckpt):
    refused(lambda: load("/etc/passwd"), "/etc/passwd", "is a file")
    refused(lambda: load(tmp_path / "nope"), "does not exist", exc=FileNotFoundError)
    (tmp_path / "empty").mkdir()
    refused(lambda: load(tmp_path / "empty"), "holds no weights", "model.safetensors", "nld_metadata.json")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"never unpickled")
    refused(lambda: load(ckpt), "never unpickles")


@pytest.fixture(scope="module")
def orbax_base(tmp_path_factory) -> pathlib.Path:
    from checkpoints_convert import convert_hf_to_orbax

    out = tmp_path_factory.mktemp("orbax") / "base"
    convert_hf_to_orbax(ROOT / "tests" / "data" / "nld-tiny", out, progress=False)
    return out


@pytest.fixture
def orbax_ckpt(orbax_base, tmp_path) -> pathlib.Path:
    dst = tmp_path / "orbax"
    shutil.copytree(orbax_base, dst)
    return dst


def _chunk(item: pathlib.Path, leaf: str) -> pathlib.Path:
    return sorted(p for p in (item / leaf).iterdir() if not p.name.startswith("."))[-1]


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_damaged_orbax_chunk_names_the_array(orbax_ckpt, damage):
    chunk = _chunk(orbax_ckpt / "params", "layers.mlp.up_proj")
    if damage == "deleted":
        chunk.unlink()
    else:
        os.truncate(chunk, 10)
    message = refused(lambda: load(orbax_ckpt), f"checkpoint {orbax_ckpt} is damaged: array 'layers.mlp.up_proj' "
                                                "unreadable (")
    assert "TensorStore" not in message and "'driver'" not in message and len(message) < 500, message


def test_damaged_orbax_leaves_stderr_clean(orbax_ckpt):
    """No stray tracebacks ("Exception ignored in coroutine", "Event loop is closed") on stderr."""
    (orbax_ckpt / "params" / "norm" / "0").unlink()
    _chunk(orbax_ckpt / "lora", "A").unlink()
    script = textwrap.dedent(f"""
        import nld_jax
        try:
            nld_jax.load({str(orbax_ckpt)!r})
        except nld_jax.CheckpointError as e:
            print(e)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0 and "is damaged: array 'norm' unreadable" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert "Event loop" not in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("content,expected", [
    ("{", "not valid JSON"), ("[]", "JSON object"), ('{"tree_metadata": []}', "tree_metadata"),
    (json.dumps({"tree_metadata": {"x": {"key_metadata": [{"key": "../../../outside"}]}}}), "plain file name"),
    (json.dumps({"tree_metadata": {"x": {"key_metadata": "embed_tokens"}}}), "key_metadata")])
def test_damaged_orbax_metadata(orbax_ckpt, content, expected):
    path = orbax_ckpt / "params" / "_METADATA"
    path.write_text(content)
    refused(lambda: load(orbax_ckpt), f"checkpoint {orbax_ckpt} is damaged", path, expected)


def test_orbax_nan_is_refused_by_name(orbax_ckpt):
    chunk = _chunk(orbax_ckpt / "params", "layers.mlp.up_proj")
    chunk.write_bytes(b"\xff" * chunk.stat().st_size)  # bf16 0xFFFF is a NaN in either byte order
    refused(lambda: load(orbax_ckpt), "layers.mlp.up_proj", "layer 1", "NaN or Inf")


def test_orbax_without_nld_metadata_says_what_it_looks_like(orbax_ckpt):
    (orbax_ckpt / "nld_metadata.json").unlink()
    refused(lambda: load(orbax_ckpt), "looks like an Orbax checkpoint", "params/_METADATA", "nld_metadata.json")


@pytest.mark.parametrize("content,expected", [("{", "not valid JSON"), ("[]", "JSON object"),
                                              ('{"format": "other"}', "format")])
def test_malformed_nld_metadata(orbax_ckpt, content, expected):
    path = orbax_ckpt / "nld_metadata.json"
    path.write_text(content)
    refused(lambda: load(orbax_ckpt), path, expected)


def test_orbax_chunk_linking_out_is_refused(orbax_ckpt, outside):
    chunk = _chunk(orbax_ckpt / "params", "norm")
    chunk.unlink()
    os.symlink(outside / "model.safetensors", chunk)
    refused(lambda: load(orbax_ckpt), chunk, "outside the checkpoint")


# --------------------------------------------------------------------------------------
# Hugging Face repository ids, through a hub cache laid out here (offline)
# --------------------------------------------------------------------------------------

@pytest.fixture
def hub(tmp_path, monkeypatch) -> pathlib.Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


@pytest.mark.parametrize("sharded", [False, True])
def test_repo_id_resolves_through_the_hub_cache(hub, tmp_path, sharded):
    source = copy_tiny(tmp_path, "src")
    if sharded:
        shard(source)
    snapshot = hub_cache(hub, "nvidia/NLD-Tiny", source)
    assert os.path.islink(snapshot / "linear_spec_lora" / "adapter_model.safetensors")
    model = nld_jax.load("nvidia/NLD-Tiny")
    ref = nld_jax.load(ROOT / "tests" / "data" / "nld-tiny")
    assert model.path == str(snapshot)
    for path, arr in flatten_tree(model.params).items():
        np.testing.assert_array_equal(np.asarray(arr), np.asarray(flatten_tree(ref.params)[path]), err_msg=path)
    np.testing.assert_array_equal(np.asarray(model.lora["B"]), np.asarray(ref.lora["B"]))
    assert model.tokenizer.encode("hello") == ref.tokenizer.encode("hello")


def test_hub_snapshot_linking_outside_its_blobs_is_refused(hub, tmp_path, outside):
    snapshot = hub_cache(hub, "nvidia/NLD-Tiny", copy_tiny(tmp_path, "src"))
    (snapshot / "model.safetensors").unlink()
    os.symlink(outside / "model.safetensors", snapshot / "model.safetensors")
    refused(lambda: nld_jax.load("nvidia/NLD-Tiny"), snapshot / "model.safetensors", "outside the checkpoint")
    other = hub_cache(hub, "other/repo", copy_tiny(tmp_path, "src2"))  # another repo's blobs are outside too
    (snapshot / "model.safetensors").unlink()
    os.symlink(os.path.realpath(other / "model.safetensors"), snapshot / "model.safetensors")
    refused(lambda: nld_jax.load("nvidia/NLD-Tiny"), snapshot / "model.safetensors", "outside the checkpoint")


def test_repo_id_not_in_cache_offline(hub):
    refused(lambda: nld_jax.load("nvidia/Not-Downloaded"), "'nvidia/Not-Downloaded'", "HF_HUB_OFFLINE",
            exc=FileNotFoundError)


def test_local_directory_wins_over_a_repo_id(hub, tmp_path, monkeypatch):
    hub_cache(hub, "nvidia/NLD-Tiny", copy_tiny(tmp_path, "src"))
    (tmp_path / "cwd" / "nvidia").mkdir(parents=True)
    local = copy_tiny(tmp_path / "cwd" / "nvidia", "NLD-Tiny")
    monkeypatch.chdir(tmp_path / "cwd")
    assert nld_jax.load("nvidia/NLD-Tiny", load_tokenizer_files=False).path == str(local)


def test_write_safetensors_round_trips_through_the_validator(tmp_path):
    tensors = {"b": np.arange(6, dtype=np.float32).reshape(2, 3), "a": np.zeros((0, 4), np.int8)}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    st = SafetensorsFile(tmp_path / "x.safetensors")
    assert st.metadata == {"format": "pt"} and st.keys() == ["b", "a"]
    np.testing.assert_array_equal(st.get("b"), tensors["b"])
