"""nld-generate and the tokenizer."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nld_jax
import nld_jax.cli.generate
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
    """The streamed text is NVIDIA's: the golden batch-1 diffusion case (threshold 0.9, the CLI's
    default here, block 8, 48 tokens) decoded by the tokenizers library itself."""
    from tokenizers import Tokenizer

    golden = next(c for c in cases["e_generate_b1"]
                  if c["threshold"] == 0.9 and c["prompt_ids"][0] == cases["prompts"]["batch"]["ids"][0])
    assert (golden["block_length"], golden["max_new_tokens"]) == (8, 48)
    prompt, generated = golden["prompt_ids"][0][:40], golden["output_ids"][0][40:]
    assert golden["prompt_ids"][0] == golden["output_ids"][0][:40] and len(generated) == 48
    rc = main(["--checkpoint", str(golden_dir), "--mode", "diffusion", "--block-length", "8",
               "--max-new-tokens", "48", "--prompt-ids", ",".join(map(str, prompt))])
    assert rc == 0
    captured = capsys.readouterr()
    expected = Tokenizer.from_file(str(golden_dir / "tokenizer.json")).decode(generated, skip_special_tokens=True)
    assert captured.out == expected + "\n"
    assert f"[diffusion] 48 tokens, {golden['nfe']} forwards" in captured.err


def test_cli_all_modes_equal_single_mode_runs(golden_dir, capsys):
    args = ["--checkpoint", str(golden_dir), "--max-new-tokens", "12", "--json", "--prompt-ids", "1,6,224,43"]
    assert main(args + ["--mode", "all"]) == 0
    together = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in together] == ["ar", "diffusion", "spec", "spec_quadratic"]
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


# --------------------------------------------------------------------------------------
# Careless users (issue 17): one line on stderr, a non-zero exit, flags named as typed
# --------------------------------------------------------------------------------------

PYTHON_NAMES = ("max_new_tokens", "block_length", "top_p", "top_k", "use_lora", "prompts[", "stop_token_ids",
                "Traceback")


def _one_line_error(capsys, prog: str = "nld-generate") -> str:
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip() and not l.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    assert not any(name in err for name in PYTHON_NAMES), err
    return lines[0]


def _checkpoint_copy(golden_dir, tmp_path, *, tokenizer: bool = True) -> pathlib.Path:
    """The golden checkpoint without its golden outputs (and without its tokenizer if asked)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(golden_dir, dst, ignore=shutil.ignore_patterns("golden"))
    if not tokenizer:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (dst / name).unlink()
    return dst


BAD_FLAGS = [
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-new-tokens", "3.7"], "--max-new-tokens"),
    (["--mode", "diffusion", "--block-length", "0"], "--block-length"),
    (["--mode", "spec", "--block-length", "1"], "--block-length"),
    (["--mode", "all", "--block-length", "1"], "--block-length"),
    (["--mode", "diffusion", "--threshold", "2"], "--threshold"),
    (["--threshold", "nan"], "--threshold"),
    (["--threshold", "high"], "--threshold"),
    (["--temperature", "-1"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "1e300"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--prompt-ids", "1,,2"], "--prompt-ids"),
    (["--prompt-ids", "1,99999"], "--prompt-ids"),
    (["--prompt-ids", ","], "--prompt-ids"),
    (["--mode", "fast"], "--mode"),
    (["--dtype", "float16"], "--dtype"),
]


def _exit_code(cli_main, argv) -> int:
    """What the command exits with: main's return value, or argparse's own SystemExit."""
    try:
        return cli_main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv,flag", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_cli_bad_flags_are_one_line_errors_that_name_the_flag(golden_dir, capsys, argv, flag):
    argv = ["--checkpoint", str(golden_dir), *argv, *([] if "--prompt-ids" in argv else ["x"])]
    assert _exit_code(main, argv) == 2
    assert flag in _one_line_error(capsys)


def test_cli_corrupt_tokenizer_names_the_file(golden_dir, tmp_path, capsys, monkeypatch):
    ckpt = _checkpoint_copy(golden_dir, tmp_path)
    (ckpt / "tokenizer.json").write_text((golden_dir / "tokenizer.json").read_text()[:100])
    assert main(["--checkpoint", str(ckpt), "x"]) == 2
    assert "tokenizer.json" in _one_line_error(capsys)
    # A reader that lets its own exception out (a bare `Exception: EOF while parsing` from the
    # tokenizers library, as before): still one line, naming the checkpoint.
    monkeypatch.setattr(nld_jax, "load", lambda *a, **k: (_ for _ in ()).throw(Exception("EOF while parsing")))
    assert main(["--checkpoint", str(ckpt), "x"]) == 2
    line = _one_line_error(capsys)
    assert str(ckpt) in line and "EOF while parsing" in line


def test_cli_invalid_utf8_prompt(golden_dir, capsys):
    # bytes that are not UTF-8 reach Python's argv as surrogate escapes
    prompt = b"def f(\xff):".decode("utf-8", "surrogateescape")
    assert main(["--checkpoint", str(golden_dir), prompt]) == 2
    assert "prompt 1 is not valid UTF-8" in _one_line_error(capsys)


def test_cli_text_prompt_without_a_tokenizer(golden_dir, tmp_path, capsys):
    ckpt = _checkpoint_copy(golden_dir, tmp_path, tokenizer=False)
    assert main(["--checkpoint", str(ckpt), "def f(x):"]) == 2
    assert "--prompt-ids" in _one_line_error(capsys)
    assert main(["--checkpoint", str(ckpt), "--prompt-ids", "1,6,224", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv,what", [([], "--prompt-ids"), (["--chat"], "tokenizer")],
                         ids=["default prompt", "chat"])
def test_cli_without_a_tokenizer_needs_prompt_ids(golden_dir, tmp_path, capsys, argv, what):
    """No prompt (the default text prompt) and --chat on a checkpoint without a tokenizer: exit 2,
    one line (test_cli_text_prompt_without_a_tokenizer covers a text prompt)."""
    ckpt = _checkpoint_copy(golden_dir, tmp_path, tokenizer=False)
    assert main(["--checkpoint", str(ckpt), *argv]) == 2
    assert what in _one_line_error(capsys)


def test_cli_lora_requested_but_absent(golden_dir, tmp_path, capsys):
    ckpt = _checkpoint_copy(golden_dir, tmp_path)
    shutil.rmtree(ckpt / "linear_spec_lora")
    assert main(["--checkpoint", str(ckpt), "--mode", "spec", "--lora", "x"]) == 2
    assert "--lora" in _one_line_error(capsys)


def test_cli_caps_max_new_tokens_to_the_context_with_one_note(golden_dir, capsys, tiny):
    """The help promises: more than the context leaves room for is capped to what fits, with a
    note. Exactly that: one note, and the generation runs to the cap (or an EOS)."""
    ids = [1, 6, 224, 43]
    room = tiny.config.max_position_embeddings - len(ids)
    assert main(["--checkpoint", str(golden_dir), "--mode", "ar", "--max-new-tokens", "100000", "--json",
                 "--prompt-ids", ",".join(map(str, ids))]) == 0
    captured = capsys.readouterr()
    notes = [l for l in captured.err.splitlines() if l.startswith("note:")]
    assert len(notes) == 1 and f"--max-new-tokens 100000 capped to {room}" in notes[0], captured.err
    tokens = json.loads(captured.out)["tokens"]
    assert len(tokens) == room or tokens[-1] == tiny.config.eos_token_id


def test_cli_ctrl_c_exits_130(golden_dir, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(nld_jax, "generate", interrupted)
    assert main(["--checkpoint", str(golden_dir), "x"]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err


def test_cli_reports_tokens_per_second_with_ms_per_forward(golden_dir, capsys):
    """The multi-prompt summary and --mode all print tokens/s with ms per forward, and say once
    that both depend on the machine's load."""
    assert main(["--checkpoint", str(golden_dir), "--max-new-tokens", "6", "a", "bb"]) == 0
    err = capsys.readouterr().err
    summary = [l for l in err.splitlines() if "2 prompts" in l]
    assert len(summary) == 1 and "tokens/s" in summary[0] and "ms per forward" in summary[0], err
    assert err.count("depend on this machine") == 1
    assert main(["--checkpoint", str(golden_dir), "--mode", "all", "--max-new-tokens", "6", "a"]) == 0
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.startswith("[") and "tokens/s" in l and "ms per forward" in l]
    assert [l.split("]")[0] for l in lines] == ["[ar", "[diffusion", "[spec", "[spec_quadratic"], err
    assert err.count("depend on this machine") == 1


def test_cli_help_names_the_checkpoint_option_once_for_all_clis(capsys):
    from nld_jax.cli import plan

    for parser in (nld_jax.cli.generate.build_parser(), plan.build_parser()):
        options = {o for a in parser._actions for o in a.option_strings}
        assert "--checkpoint" in options
    assert plan.build_parser().parse_args(["--model", "8b"]).model == "8b"  # the alias


# nld-plan: errors found before anything is compiled

PLAN_ERRORS = [
    (["--model", "8b", "--mesh", "model=4"], "model"),
    (["--model", "70b"], "3b, 8b, 14b"),
    (["--checkpoint", "bogus"], "3b, 8b, 14b"),
    (["--model", "8b", "--batch", "-1"], "--batch"),
    (["--model", "8b", "--batch", "1e11"], "--batch"),
    (["--model", "8b", "--headroom", "2"], "--headroom"),
    (["--model", "8b", "--headroom", "-0.1"], "--headroom"),
    (["--model", "8b", "--mesh", "data=2,data=4"], "--mesh"),
    (["--model", "8b", "--mesh", "data=-1"], "--mesh"),
    (["--model", "8b", "--mesh", "tensor=0"], "--mesh"),
    (["--model", "8b", "--mesh", "tensor"], "--mesh"),
    (["--model", "8b", "--mesh", "data=4096"], "4096"),
    (["--model", "8b", "--batch", "1048576", "--max-len", "16777216"], "too large to plan"),
    (["--model", "8b", "--max-len", "10"], "--max-len"),
    (["--model", "8b", "--modes", "fast"], "--modes"),
    (["--model", "8b", "--lora-rank", "-1"], "--lora-rank"),
    (["--mesh", "tensor=2"], "--checkpoint"),
    ([], "--checkpoint"),
    (["--model", "8b", "--bogus"], "unrecognized arguments"),
    (["--model", "8b", "--dtype", "float16"], "--dtype"),
    (["--model", "8b", "--quantize", "int4"], "--quantize"),
    (["--model", "8b", "--kv-cache", "fp8"], "--kv-cache"),
    (["--model", "8b", "--device", "tpu9"], "--device"),
    (["--model", "8b", "--backend", "tpu"], "--backend"),
    (["--model", "8b", "--batch", "x"], "--batch"),
    (["--model", "8b", "--batch", "0"], "--batch"),
    (["--model", "8b", "--max-len", "0"], "--max-len"),
    (["--model", "8b", "--prompt-len", "0"], "--prompt-len"),
    (["--model", "8b", "--block-length", "x"], "--block-length"),
    (["--model", "8b", "--headroom", "x"], "--headroom"),
    (["--model", "8b", "--lora-rank", "x"], "--lora-rank"),
    (["--model", "8b", "--modes", ","], "--modes"),
    (["--model", "8b", "--max-len", "100", "--prompt-len", "90"], "--max-len"),
    (["--checkpoint", "./no-such-checkpoint-dir"], "config.json"),
]


@pytest.mark.parametrize("argv,what", PLAN_ERRORS, ids=[" ".join(a) for a, _ in PLAN_ERRORS])
def test_plan_errors_are_one_line(capsys, argv, what):
    """``--batch 1048576 --max-len 16777216`` used to abort the process inside XLA ("overflow in
    static extent product"); ``--headroom 2`` printed "-80.00 GB usable"."""
    from nld_jax.cli import plan

    assert _exit_code(plan.main, argv) == 2
    assert what in _one_line_error(capsys, "nld-plan")


def test_plan_checkpoint_directory_errors_are_one_line(golden_dir, tmp_path, capsys):
    from nld_jax.cli import plan

    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"hidden_size": 64,')
    (tmp_path / "bad").mkdir()
    config = json.loads((golden_dir / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "hidden_size": -1}))
    for name, what in (("empty", "config.json"), ("broken", "not valid JSON"), ("bad", "hidden_size")):
        assert _exit_code(plan.main, ["--checkpoint", str(tmp_path / name)]) == 2, name
        assert what in _one_line_error(capsys, "nld-plan"), name


def test_plan_mesh_larger_than_the_process_is_one_line(capsys):
    """This process started JAX with 8 CPU devices; a 16-device plan cannot get more here."""
    from nld_jax.cli import plan

    assert len(jax.devices("cpu")) == 8  # JAX has started: the fake device count is fixed
    assert _exit_code(plan.main, ["--model", "8b", "--mesh", "data=16", "--backend", "cpu"]) == 2
    assert "16 devices" in _one_line_error(capsys, "nld-plan")


def test_plan_compiler_refusal_and_ctrl_c(capsys, monkeypatch):
    """A compiler error (JaxRuntimeError) is one line and exit 2; Ctrl-C exits 130 with one line;
    anything else (a bug) keeps its traceback."""
    import nld_jax.planning
    from nld_jax.cli import plan

    class JaxRuntimeError(RuntimeError):
        pass

    def raising(exc):
        def fake_plan(*args, **kwargs):
            raise exc
        return fake_plan

    argv = ["--model", "3b", "--mesh", "data=1", "--batch", "1", "--max-len", "256"]
    monkeypatch.setattr(nld_jax.planning, "plan", raising(JaxRuntimeError("RESOURCE_EXHAUSTED: too big\ndetails")))
    assert _exit_code(plan.main, argv) == 2
    assert "the compiler refused this plan: RESOURCE_EXHAUSTED: too big" in _one_line_error(capsys, "nld-plan")
    monkeypatch.setattr(nld_jax.planning, "plan", raising(KeyboardInterrupt()))
    assert _exit_code(plan.main, argv) == 130
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert err == ["nld-plan: interrupted"], err
    monkeypatch.setattr(nld_jax.planning, "plan", raising(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        plan.main(argv)


def test_plan_help_states_every_default():
    from nld_jax.cli import plan

    parser = plan.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert "default" in action.help or "required" in action.help, action.option_strings
