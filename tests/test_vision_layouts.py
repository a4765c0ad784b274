"""transformers' Mistral3 tensor names (4.x: ``language_model.model.*``, ``vision_tower.*``; 5.x:
``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.*``) read like NVIDIA's: the tiny
VLM re-keyed in a temporary directory loads to the same weights, generates the same tokens with
images, converts to the same Orbax checkpoint and back to NVIDIA's names; two layouts in one
checkpoint are refused naming the file and a key of each."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

import nld_jax
from nld_jax.checkpoint.errors import CheckpointError
from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors
from nld_jax.params import flatten_tree

from checkpoints_convert import convert_hf_to_orbax, convert_orbax_to_hf
from checkpoints_convert.testing import hf_dir_tensors
from test_vision import _write_vlm  # noqa: F401  (the fixture's checkpoint writer)

# NVIDIA's prefix -> each transformers layout's (longer NVIDIA prefixes first)
RENAMES = {
    "transformers-4": [("encoder.vision_tower.", "vision_tower."),
                       ("encoder.multi_modal_projector.", "multi_modal_projector."),
                       ("encoder.", "language_model.model."), ("diffusion_head.", "language_model.lm_head.")],
    "transformers-5": [("encoder.vision_tower.", "model.vision_tower."),
                       ("encoder.multi_modal_projector.", "model.multi_modal_projector."),
                       ("encoder.", "model.language_model."), ("diffusion_head.", "lm_head.")],
}


def _rename(key: str, layout: str) -> str:
    for nvidia, theirs in RENAMES[layout]:
        if key.startswith(nvidia):
            return theirs + key[len(nvidia):]
    raise AssertionError(key)


def rekey(source: pathlib.Path, directory: pathlib.Path, rename) -> pathlib.Path:
    """A copy of the checkpoint ``source`` with every tensor name passed through ``rename``."""
    shutil.copytree(source, directory)
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name in sorted(set(index["weight_map"].values())):
        st = SafetensorsFile(str(source / name))
        tensors = {rename(k): np.array(st.get(k)) for k in st.keys_in_file_order()}
        st.close()
        write_safetensors(directory / name, tensors, {"format": "pt"})
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return directory


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return _write_vlm(tmp_path_factory.mktemp("vlm-layouts") / "nvidia")


@pytest.fixture(scope="module")
def reference(vlm_dir):
    return nld_jax.load(vlm_dir, dtype="float32")


@pytest.fixture(scope="module", params=sorted(RENAMES))
def rekeyed(request, vlm_dir, tmp_path_factory):
    layout = request.param
    return rekey(vlm_dir, tmp_path_factory.mktemp(layout) / layout, lambda k: _rename(k, layout))


def _same(a: dict, b: dict) -> None:
    fa, fb = flatten_tree(a), flatten_tree(b)
    assert fa.keys() == fb.keys()
    for leaf in fa:
        np.testing.assert_array_equal(np.asarray(fa[leaf]), np.asarray(fb[leaf]), err_msg=leaf)


def test_transformers_layout_loads_and_generates_the_same(rekeyed, reference):
    model = nld_jax.load(rekeyed, dtype="float32")
    _same(model.params, reference.params)
    _same(model.vision, reference.vision)
    rng = np.random.default_rng(3)
    images = [[rng.integers(0, 256, (24, 32, 3), np.uint8)], [rng.integers(0, 256, (16, 16, 3), np.uint8)]]
    prompts = [[1, 40, 10, 41], [1, 42]]
    for mode in ("ar", "spec"):
        kwargs = dict(mode=mode, max_new_tokens=10, block_length=4, images=images)
        assert nld_jax.generate(model, prompts, **kwargs).tokens == nld_jax.generate(reference, prompts,
                                                                                     **kwargs).tokens


def test_transformers_layout_converts_to_nvidia_names(rekeyed, vlm_dir, tmp_path):
    report = convert_hf_to_orbax(rekeyed, tmp_path / "orbax", progress=False, verify=True)
    assert report.verify.max_abs_diff == 0.0 and report.verify.vision_max_abs_diff == 0.0
    convert_orbax_to_hf(tmp_path / "orbax", tmp_path / "back", progress=False)
    assert hf_dir_tensors(tmp_path / "back") == hf_dir_tensors(vlm_dir)  # NVIDIA's names, the same bytes


@pytest.mark.parametrize("layout", sorted(RENAMES))
def test_mixed_layouts_are_refused(vlm_dir, tmp_path, layout):
    """One tensor renamed: the loader and the converter name the file and both keys."""
    odd = "encoder.multi_modal_projector.linear_2.weight"
    mixed = rekey(vlm_dir, tmp_path / "mixed", lambda k: _rename(k, layout) if k == odd else k)
    theirs = _rename(odd, layout)
    pattern = rf"model-0000[12]-of-00002.safetensors: tensor names of two layouts.*{theirs}"
    with pytest.raises(CheckpointError, match=pattern):
        nld_jax.load(mixed)
    with pytest.raises(CheckpointError, match=pattern):
        convert_hf_to_orbax(mixed, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_name_twice_after_renaming_is_refused(vlm_dir, tmp_path):
    """transformers 4.x's ``vision_tower.X`` and ``language_model.model.vision_tower.X`` would
    both be NVIDIA's ``encoder.vision_tower.X``."""
    layout = "transformers-4"
    twice = rekey(vlm_dir, tmp_path / "twice", lambda k: _rename(k, layout))
    shard = twice / "model-00002-of-00002.safetensors"
    st = SafetensorsFile(str(shard))
    tensors = {k: np.array(st.get(k)) for k in st.keys_in_file_order()}
    st.close()
    tensors["language_model.model.vision_tower.ln_pre.weight"] = tensors["vision_tower.ln_pre.weight"]
    write_safetensors(shard, tensors, {"format": "pt"})
    index_path = twice / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["language_model.model.vision_tower.ln_pre.weight"] = shard.name
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="are both 'encoder.vision_tower.ln_pre.weight'"):
        nld_jax.load(twice)
