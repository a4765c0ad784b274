"""Config parsing, presets and RoPE constants against values computed by NVIDIA's harness."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from nld_jax.checkpoint.directory import load_hf_config
from nld_jax.config import (ConfigError, PRESETS, RopeConfig, config_from_hf, config_to_hf,
                            yarn_attention_factor)
from nld_jax.rope import _yarn_correction_range, inverse_frequencies


def _golden_hf(golden_dir) -> dict:
    with open(golden_dir / "config.json") as f:
        return json.load(f)


def test_golden_config(golden_dir):
    c = load_hf_config(golden_dir)
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (512, 64, 192, 2)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (4, 2, 32)
    assert (c.bos_token_id, c.eos_token_id, c.mask_token_id, c.block_size) == (1, 2, 3, 8)
    assert c.rope == RopeConfig(theta=1e6, rope_type="yarn", factor=4.0, original_max_position_embeddings=32,
                                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
                                llama_4_scaling_beta=0.1)
    hash(c)  # static jit argument


def test_old_rope_form_equals_new(golden_dir):
    hf = _golden_hf(golden_dir)
    rope = dict(hf.pop("rope_parameters"))
    hf["rope_theta"] = rope.pop("rope_theta")
    hf["rope_scaling"] = rope
    assert config_from_hf(hf) == load_hf_config(golden_dir)


def test_round_trip_through_hf_dict(golden_dir):
    c = load_hf_config(golden_dir)
    assert config_from_hf(config_to_hf(c)) == c
    for name, preset in PRESETS.items():
        assert config_from_hf(config_to_hf(preset)) == preset, name


@pytest.mark.parametrize("field,value", [("qk_layernorm_mode", True), ("num_experts", 8), ("sliding_window", 4096),
                                         ("attention_bias", True), ("hidden_act", "gelu"), ("dlm_type", "dream")])
def test_architecture_changes_are_refused_by_name(golden_dir, field, value):
    hf = _golden_hf(golden_dir)
    hf[field] = value
    with pytest.raises(ConfigError, match=field):
        config_from_hf(hf)


def test_unknown_rope_field_refused(golden_dir):
    hf = _golden_hf(golden_dir)
    hf["rope_parameters"]["short_factor"] = [1.0]
    with pytest.raises(ConfigError, match="short_factor"):
        config_from_hf(hf)


def test_presets_match_the_spec():
    expected = {"3b": (3072, 9216, 26, 1e6, 3.83e9), "8b": (4096, 14336, 34, 1e6, 8.49e9),
                "14b": (5120, 16384, 40, 1e9, 13.51e9)}
    for name, (D, F, L, theta, n) in expected.items():
        c = PRESETS[name]
        assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.rope.theta) == (D, F, L, theta)
        assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.vocab_size) == (32, 8, 128, 131072)
        assert c.num_params() == pytest.approx(n, rel=0.01)


def test_yarn_constants_match_nvidia_selfcheck(golden_dir):
    """low/high and inv_freq values reported by NVIDIA's harness (golden/selfcheck.json)."""
    with open(golden_dir / "golden" / "selfcheck.json") as f:
        checks = {r["check"]: r for r in json.load(f)["results"]}
    c8 = checks["rope: real 8B YaRN (low/high (20, 37), inv_freq values, attention_factor 1.0)"]
    c14 = checks["rope: real 14B YaRN (low/high (13, 25), inv_freq values, attention_factor 1.0)"]
    for preset, ref, lo_hi in ((PRESETS["8b"], c8, (20, 37)), (PRESETS["14b"], c14, (13, 25))):
        assert _yarn_correction_range(preset.rope, 128) == lo_hi
        inv = inverse_frequencies(preset.rope, 128)
        np.testing.assert_allclose(inv[1], ref["inv1"], rtol=1e-6)
        np.testing.assert_allclose(inv[63], ref["inv63"], rtol=1e-6)
        assert yarn_attention_factor(preset.rope) == 1.0
    tiny = load_hf_config(golden_dir).rope
    assert _yarn_correction_range(tiny, 32) == (0, 2)


def test_yarn_attention_factor_default_when_mscale_absent():
    rope = RopeConfig(factor=16.0, mscale=None, mscale_all_dim=None)
    assert yarn_attention_factor(rope) == pytest.approx(0.1 * math.log(16.0) + 1.0)


@pytest.mark.parametrize("change,check", [
    ({"num_hidden_layers": 1024}, lambda c: c.num_hidden_layers == 1024),
    ({"eos_token_id": [2, 7]}, lambda c: c.eos_token_id == 2),
    ({"bos_token_id": None, "eos_token_id": []}, lambda c: c.bos_token_id is None and c.eos_token_id is None),
    ({"num_key_value_heads": None, "head_dim": None}, lambda c: (c.num_key_value_heads, c.head_dim) == (4, 16)),
    ({"tie_word_embeddings": None, "block_size": None}, lambda c: not c.tie_word_embeddings and c.block_size == 32),
    ({"rms_norm_eps": 1}, lambda c: c.rms_norm_eps == 1.0),
    ({"partial_rotary_factor": 1.0, "attention_bias": None}, lambda c: True),
])
def test_edges_that_real_configs_may_hold_are_accepted(golden_dir, change, check):
    hf = _golden_hf(golden_dir)
    hf.update(change)
    assert check(config_from_hf(hf))


@pytest.mark.parametrize("field,value", [
    ("num_hidden_layers", 8.7), ("num_hidden_layers", 8.0), ("num_hidden_layers", "8"), ("num_hidden_layers", True),
    ("num_hidden_layers", 1025), ("vocab_size", 2**24 + 1), ("intermediate_size", -1), ("head_dim", 30.0),
    ("max_position_embeddings", 0), ("rms_norm_eps", -1e-5), ("rms_norm_eps", float("inf")), ("mask_token_id", 3.0),
    ("block_size", 0), ("tie_word_embeddings", 0), ("partial_rotary_factor", True), ("attention_bias", 0)])
def test_types_and_ranges_are_refused_naming_field_and_value(golden_dir, field, value):
    hf = _golden_hf(golden_dir)
    hf[field] = value
    with pytest.raises(ConfigError, match=field) as info:
        config_from_hf(hf)
    assert repr(value) in str(info.value)


def test_rope_values_are_checked(golden_dir):
    for field, value in (("rope_theta", 1.0), ("factor", 0.9), ("beta_slow", 0), ("truncate", "no"),
                         ("original_max_position_embeddings", 32.5), ("llama_4_scaling_beta", -0.1),
                         ("mscale", float("nan"))):
        hf = _golden_hf(golden_dir)
        hf["rope_parameters"][field] = value
        with pytest.raises(ConfigError, match=field):
            config_from_hf(hf)
