"""nld-convert on the tiny VLM (tests/data/vlm-tiny in NVIDIA's layout, two shards): HF -> Orbax
-> HF gives the same tensors back bit for bit, the Orbax copy generates the same tokens with
images, --verify compares the image features and logits and catches a corrupted vision tensor,
and --quantize / load(quantize=) quantize the text decoder only."""

from __future__ import annotations

import numpy as np
import pytest
import tensorstore as ts

import nld_jax
from nld_jax.params import flatten_tree

from checkpoints_convert import convert_hf_to_orbax, convert_orbax_to_hf, save_orbax
from checkpoints_convert.cli import main as convert_main
from checkpoints_convert.testing import hf_dir_tensors
from checkpoints_convert.verify import VerificationError, verify_conversion
from test_vision import _write_vlm  # noqa: F401  (the fixture's checkpoint writer)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return _write_vlm(tmp_path_factory.mktemp("vlm-convert") / "nld-vlm-tiny")


@pytest.fixture(scope="module")
def converted(vlm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vlm-orbax") / "orbax"
    report = convert_hf_to_orbax(vlm_dir, out, progress=False, verify=True)
    return out, report


@pytest.fixture(scope="module")
def image_batch():
    rng = np.random.default_rng(7)
    images = [[rng.integers(0, 256, (24, 32, 3), np.uint8)], None, [rng.integers(0, 256, (16, 40, 3), np.uint8)]]
    return [[1, 40, 10, 41], [1, 43, 44], [1, 46]], images


def _same_tree(a: dict, b: dict) -> None:
    fa, fb = flatten_tree(a), flatten_tree(b)
    assert fa.keys() == fb.keys()
    for leaf in fa:
        assert fa[leaf].dtype == fb[leaf].dtype, leaf
        np.testing.assert_array_equal(np.asarray(fa[leaf]), np.asarray(fb[leaf]), err_msg=leaf)


def test_round_trip_is_bit_exact_and_generates_the_same(vlm_dir, converted, image_batch, tmp_path):
    out, report = converted
    assert report.verify.vision_max_abs_diff == 0.0 and report.verify.max_abs_diff == 0.0
    assert "with an image" in report.summary()
    source = nld_jax.load(vlm_dir, dtype="float32")
    orbax = nld_jax.load(out, dtype="float32")
    _same_tree(source.params, orbax.params)
    _same_tree(source.vision, orbax.vision)
    assert orbax.vision_config == source.vision_config
    prompts, images = image_batch
    for mode in ("ar", "spec"):
        kwargs = dict(mode=mode, max_new_tokens=12, block_length=4, images=images)
        assert nld_jax.generate(orbax, prompts, **kwargs).tokens == nld_jax.generate(source, prompts, **kwargs).tokens
    back = convert_orbax_to_hf(out, tmp_path / "back", progress=False, verify=True)
    assert back.verify.vision_max_abs_diff == 0.0
    assert hf_dir_tensors(tmp_path / "back") == hf_dir_tensors(vlm_dir)  # same files, names, bytes


def test_verify_catches_a_corrupted_vision_tensor(vlm_dir, converted, tmp_path):
    import shutil

    out = tmp_path / "corrupt"
    shutil.copytree(converted[0], out)
    array = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(out / "vision" /
                                                                                 "projector.linear_1")}}).result()
    values = array.read().result()
    values[0, 0] += 0.5
    array.write(values).result()
    with pytest.raises(VerificationError, match="logits differ.*with an image"):
        verify_conversion(str(vlm_dir), str(out))


def test_cli_round_trip_with_verify(vlm_dir, tmp_path, capsys):
    assert convert_main([str(vlm_dir), str(tmp_path / "o"), "--verify", "--no-progress"]) == 0
    assert "with an image: max |feature or logit diff| 0" in capsys.readouterr().out
    assert convert_main([str(tmp_path / "o"), str(tmp_path / "h"), "--reverse", "--no-progress"]) == 0
    assert hf_dir_tensors(tmp_path / "h") == hf_dir_tensors(vlm_dir)


def test_quantize_leaves_the_vision_tower_in_float(vlm_dir, image_batch, tmp_path):
    """--quantize and load(quantize=) quantize the text decoder only; the two agree exactly."""
    report = convert_hf_to_orbax(vlm_dir, tmp_path / "q8", quantize="int8", progress=False, verify=True)
    assert report.verify.quantized == "int8" and report.verify.vision_max_abs_diff == 0.0
    stored = nld_jax.load(tmp_path / "q8", dtype="float32")
    on_load = nld_jax.load(vlm_dir, dtype="float32", quantize="int8")
    for model in (stored, on_load):
        assert model.quantization is not None and model.quantization.scheme == "int8"
        assert {str(x.dtype) for x in flatten_tree(model.vision).values()} == {"float32"}
    prompts, images = image_batch
    assert (nld_jax.generate(stored, prompts, max_new_tokens=8, images=images).tokens
            == nld_jax.generate(on_load, prompts, max_new_tokens=8, images=images).tokens)
    assert nld_jax.quantize(nld_jax.load(vlm_dir, dtype="float32")).vision is not None


def test_save_orbax_writes_the_vision_item(vlm_dir, tmp_path):
    model = nld_jax.load(vlm_dir, dtype="float32")
    save_orbax(model, tmp_path / "saved")
    again = nld_jax.load(tmp_path / "saved", dtype="float32")
    _same_tree(model.vision, again.vision)


def test_orbax_without_vision_item_is_refused(converted, tmp_path):
    import shutil

    out = tmp_path / "no-vision"
    shutil.copytree(converted[0], out)
    shutil.rmtree(out / "vision")
    with pytest.raises(ValueError, match="no vision/ item"):
        nld_jax.load(out)
    with pytest.raises(ValueError, match="no vision/ item"):
        convert_orbax_to_hf(out, tmp_path / "h", progress=False)


def _with_nan_in_vision(directory):
    """The vision shard of a _write_vlm checkpoint with one NaN in the projector's linear_1."""
    from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors

    shard = directory / "model-00002-of-00002.safetensors"
    st = SafetensorsFile(str(shard))
    tensors = {k: np.array(st.get(k)) for k in st.keys_in_file_order()}
    st.close()
    tensors["encoder.multi_modal_projector.linear_1.weight"][1, 2] = np.nan
    write_safetensors(shard, tensors, {"format": "pt"})
    return directory


def test_vision_weights_count_in_the_finiteness_budget(tmp_path, monkeypatch):
    """check_finite=None checks when text + vision weights fit the budget (and names the vision
    tensor), not when only the text weights do; the converter refuses the NaN in both directions."""
    from nld_jax.checkpoint import finite
    from nld_jax.checkpoint.errors import CheckpointError
    from nld_jax.vision.params import vision_specs

    bad = _with_nan_in_vision(_write_vlm(tmp_path / "nan"))
    model = nld_jax.load(bad, check_finite=False)
    text_bytes = model.config.num_params() * 4
    vision_bytes = sum(int(np.prod(s.shape)) for s in vision_specs(model.vision_config).values()) * 4
    monkeypatch.setattr(finite, "DEFAULT_LIMIT_BYTES", text_bytes + vision_bytes)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: tensor "
                                              r"'encoder.multi_modal_projector.linear_1.weight' holds a non-finite"):
        nld_jax.load(bad)
    monkeypatch.setattr(finite, "DEFAULT_LIMIT_BYTES", text_bytes + vision_bytes - 1)
    assert nld_jax.load(bad).vision is not None  # unchecked: over the budget
    with pytest.raises(ValueError, match="encoder.multi_modal_projector.linear_1.weight' holds NaN"):
        convert_hf_to_orbax(bad, tmp_path / "refused", progress=False)
    convert_hf_to_orbax(bad, tmp_path / "kept", progress=False, check_finite=False)
    with pytest.raises(CheckpointError, match="array 'projector.linear_1' holds NaN"):
        nld_jax.load(tmp_path / "kept", check_finite=True)
    with pytest.raises(ValueError, match="vision/projector.linear_1.*holds NaN"):
        convert_orbax_to_hf(tmp_path / "kept", tmp_path / "back", progress=False)


def test_orbax_vision_restores_into_a_mesh(converted, vlm_dir):
    """Each device reads its slice of the vision item: heads over tensor, as from safetensors."""
    from nld_jax.sharding import make_mesh

    mesh = make_mesh(data=1, fsdp=2, tensor=2)
    from_orbax = nld_jax.load(converted[0], dtype="float32", mesh=mesh)
    from_hf = nld_jax.load(vlm_dir, dtype="float32", mesh=mesh)
    for a, b in zip(flatten_tree(from_orbax.vision).values(), flatten_tree(from_hf.vision).values()):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert from_orbax.vision["tower"]["layers"]["attention"]["q_proj"].sharding.spec[2] == "tensor"
