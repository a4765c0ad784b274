"""nld-generate and the tokenizer."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np

import nld_jax
from nld_jax.cli.generate import main
from nld_jax.decode import DecodeInputs, DecodeOptions, cache_size_for, decode
from nld_jax.kv_cache import KVCache


def test_tokenizer_round_trips_golden_prompts(tiny, cases):
    for group in ("batch", "eos_batch"):
        for ids, text in zip(cases["prompts"][group]["ids"], cases["prompts"][group]["text"]):
            assert tiny.tokenizer.decode(ids) == text
            assert tiny.tokenizer.encode(text) == ids  # BOS added, as the golden prompts have it


def test_text_prompts_equal_id_prompts(tiny, cases):
    text = cases["prompts"]["batch"]["text"][0]
    ids = cases["prompts"]["batch"]["ids"][0]
    a = nld_jax.generate(tiny, [text], mode="ar", max_new_tokens=8)
    b = nld_jax.generate(tiny, [ids], mode="ar", max_new_tokens=8)
    assert a.tokens == b.tokens and a.text == [tiny.tokenizer.decode(b.tokens[0])]


def test_cli_json(golden_dir, capsys):
    rc = main(["--checkpoint", str(golden_dir), "--mode", "spec", "--max-new-tokens", "16", "--json",
               "--prompt-ids", "1,6,224,43", "def f(x):"])
    assert rc == 0
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [l["prompt"] for l in lines] == ["1,6,224,43", "def f(x):"]
    for rec in lines:
        assert {"tokens", "text", "nfe", "tpf", "tokens_per_second"} <= set(rec)
        assert rec["tpf"] == round(len(rec["tokens"]) / rec["nfe"], 4)


def test_cli_streams_text(golden_dir, capsys, cases):
    ids = ",".join(map(str, cases["prompts"]["batch"]["ids"][0]))
    rc = main(["--checkpoint", str(golden_dir), "--mode", "diffusion", "--block-length", "8",
               "--max-new-tokens", "16", "--prompt-ids", ids])
    assert rc == 0
    captured = capsys.readouterr()
    model = nld_jax.load(golden_dir)
    expected = nld_jax.generate(model, [cases["prompts"]["batch"]["ids"][0]], mode="diffusion",
                                block_length=8, max_new_tokens=16, threshold=0.9).text[0]
    assert captured.out.strip() == expected.strip()
    assert "TPF" in captured.err


def test_cli_all_modes_equal_single_mode_runs(golden_dir, capsys):
    args = ["--checkpoint", str(golden_dir), "--max-new-tokens", "12", "--json", "--prompt-ids", "1,6,224,43"]
    assert main(args + ["--mode", "all"]) == 0
    together = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in together] == ["ar", "diffusion", "spec"]
    for rec in together:
        assert main(args + ["--mode", rec["mode"]]) == 0
        alone = json.loads(capsys.readouterr().out)
        assert (alone["tokens"], alone["nfe"]) == (rec["tokens"], rec["nfe"])
    assert main(["--checkpoint", str(golden_dir), "--mode", "all", "--chat"]) == 2
    assert "one mode" in capsys.readouterr().err


def test_cli_errors(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope"), "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["--prompt-ids", "1,99999"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err


def test_readme_jit_example_traces_inside_user_jit(tiny, cases):
    """decode() composes inside a user's jax.jit (the README's example), matching generate()."""
    opts = DecodeOptions(mode="diffusion", max_new_tokens=16, block_length=8, use_threshold=True)
    traces = []

    @jax.jit
    def my_eval_step(params, prompts, lengths, key):
        traces.append(1)
        cache = KVCache.empty(tiny.config, prompts.shape[0], cache_size_for(prompts.shape[1], opts))
        inputs = DecodeInputs(prompts, lengths, temperature=jnp.float32(0), threshold=jnp.float32(0.9), key=key)
        out, _ = decode(params, None, cache, inputs, config=tiny.config, options=opts)
        return out.tokens, out.num_tokens, out.nfe

    prompts = cases["prompts"]["batch"]["ids"]
    toks, num, nfe = my_eval_step(tiny.params, jnp.asarray(prompts, jnp.int32), jnp.asarray([40, 40], jnp.int32),
                                  jax.random.PRNGKey(0))
    my_eval_step(tiny.params, jnp.asarray(prompts, jnp.int32), jnp.asarray([40, 40], jnp.int32), jax.random.PRNGKey(1))
    assert len(traces) == 1
    ref = nld_jax.generate(tiny, prompts, mode="diffusion", max_new_tokens=16, block_length=8, threshold=0.9)
    assert [np.asarray(toks)[b, :int(num[b])].tolist() for b in range(2)] == ref.tokens
    assert np.asarray(nfe).tolist() == ref.nfe
