"""Bad input gets a clear error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import nld_jax
from nld_jax.checkpoint.hf import CheckpointError
from nld_jax.checkpoint.safetensors_io import SafetensorsFile, write_safetensors


def test_empty_prompt(tiny):
    with pytest.raises(ValueError, match="empty"):
        nld_jax.generate(tiny, [[1, 5], []], mode="ar", max_new_tokens=4)
    with pytest.raises(ValueError, match="non-empty"):
        nld_jax.generate(tiny, [], mode="ar", max_new_tokens=4)


def test_prompt_longer_than_context(tiny):
    limit = tiny.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        nld_jax.generate(tiny, [[1] * (limit + 1)], mode="ar", max_new_tokens=1)
    with pytest.raises(ValueError, match="context"):
        nld_jax.generate(tiny, [[1] * (limit - 4)], mode="spec", max_new_tokens=8)
    with pytest.raises(ValueError, match="context"):
        nld_jax.forward(tiny, [[1] * (limit + 1)])


def test_token_ids_outside_vocabulary(tiny):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        nld_jax.generate(tiny, [[1, tiny.config.vocab_size]], mode="ar", max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        nld_jax.generate(tiny, [[1, -3]], mode="ar", max_new_tokens=4)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        nld_jax.block_logits(tiny, [[1, 2]], [[9999, 3]])


def test_unknown_mode_and_bad_settings(tiny):
    with pytest.raises(ValueError, match="unknown mode"):
        nld_jax.generate(tiny, [[1, 5]], mode="beam", max_new_tokens=4)
    with pytest.raises(ValueError, match="temperature"):
        nld_jax.generate(tiny, [[1, 5]], mode="ar", temperature=-1.0, max_new_tokens=4)
    with pytest.raises(ValueError, match="threshold"):
        nld_jax.generate(tiny, [[1, 5]], mode="diffusion", threshold=1.5, max_new_tokens=4)
    with pytest.raises(ValueError, match="block_length"):
        nld_jax.generate(tiny, [[1, 5]], mode="spec", block_length=1, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        nld_jax.generate(tiny, [[1, 5]], mode="ar", max_new_tokens=0)


def test_text_prompt_without_tokenizer(golden_dir):
    model = nld_jax.load(golden_dir, load_tokenizer_files=False)
    with pytest.raises(ValueError, match="tokenizer"):
        nld_jax.generate(model, ["hello"], mode="ar", max_new_tokens=2)


def test_lora_requested_but_absent(golden_dir):
    model = nld_jax.load(golden_dir, load_lora=False)
    with pytest.raises(ValueError, match="LoRA"):
        nld_jax.generate(model, [[1, 5]], mode="spec", use_lora=True, max_new_tokens=4)


def _copy_checkpoint(golden_dir, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(golden_dir, dst, ignore=shutil.ignore_patterns("golden"))
    return dst


def _rewrite(path, edit):
    st = SafetensorsFile(path)
    tensors = {k: np.array(v) for k, v in st.items()}
    st.close()
    edit(tensors)
    write_safetensors(path, tensors, {"format": "pt"})


def test_checkpoint_missing_a_tensor(golden_dir, tmp_path):
    dst = _copy_checkpoint(golden_dir, tmp_path)
    _rewrite(dst / "model.safetensors", lambda t: t.pop("encoder.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.mlp\.up_proj\.weight"):
        nld_jax.load(dst)


def test_checkpoint_with_a_wrong_shape(golden_dir, tmp_path):
    dst = _copy_checkpoint(golden_dir, tmp_path)

    def shrink(t):
        t["encoder.layers.0.self_attn.k_proj.weight"] = t["encoder.layers.0.self_attn.k_proj.weight"][:32]

    _rewrite(dst / "model.safetensors", shrink)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape"):
        nld_jax.load(dst)


def test_checkpoint_with_an_unexpected_tensor(golden_dir, tmp_path):
    dst = _copy_checkpoint(golden_dir, tmp_path)

    def add(t):
        t["encoder.layers.0.self_attn.q_norm.weight"] = np.ones(32, np.float32)

    _rewrite(dst / "model.safetensors", add)
    with pytest.raises(CheckpointError, match="q_norm"):
        nld_jax.load(dst)


def test_pickle_checkpoint_is_refused(golden_dir, tmp_path):
    dst = _copy_checkpoint(golden_dir, tmp_path)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match="never unpickles"):
        nld_jax.load(dst)


def test_unknown_config_field_is_refused(golden_dir, tmp_path):
    dst = _copy_checkpoint(golden_dir, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["num_experts_per_tok"] = 2
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(nld_jax.ConfigError, match="num_experts_per_tok"):
        nld_jax.load(dst)


def test_sharded_checkpoint_loads_like_single_file(golden_dir, tmp_path):
    dst = _copy_checkpoint(golden_dir, tmp_path)
    st = SafetensorsFile(dst / "model.safetensors")
    tensors = {k: np.array(v) for k, v in st.items()}
    st.close()
    (dst / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(dst / fname, {k: tensors[k] for k in keys}, {"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    sharded = nld_jax.load(dst)
    single = nld_jax.load(golden_dir)
    ids = [[1, 6, 224, 43, 503]]
    np.testing.assert_array_equal(np.asarray(nld_jax.forward(sharded, ids)), np.asarray(nld_jax.forward(single, ids)))
