"""The examples run as written (the README and the issue call them part of the product)."""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import runpy
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def test_jit_generate_traces_once(capsys):
    runpy.run_path(str(EXAMPLES / "jit_generate.py"))["main"]([])  # [] : not pytest's own argv
    out = capsys.readouterr().out
    assert "traced 1 time(s) for 2 calls" in out
    spec_lines = [line for line in out.splitlines() if line.strip().startswith("spec")]
    assert len(spec_lines) == 2  # two thresholds
    for line in spec_lines:  # greedy spec == greedy AR on every row
        agreement = line.split("agreement with AR [")[1].split("]")[0]
        assert all(float(a) == 1.0 for a in agreement.split(",")), line


@pytest.mark.slow
def test_convert_and_generate_script(golden_dir, tmp_path):
    bin_dir = os.path.dirname(sys.executable)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(["bash", str(EXAMPLES / "convert_and_generate.sh"), str(golden_dir), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    assert [r["mode"] for r in records] == ["ar", "diffusion", "spec", "spec_quadratic"]
    assert all(r["tokens"] for r in records)
    assert (tmp_path / "hf-again" / "model.safetensors.index.json").exists()
    assert (tmp_path / "hf-again" / "linear_spec_lora" / "adapter_config.json").exists()


@pytest.mark.slow
def test_finetune_sft_and_lora(golden_dir, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"def f{i}(x):", "response": f"\n    return x + {i}\n"})
                              for i in range(4)) + "\n")
    finetune = runpy.run_path(str(EXAMPLES / "finetune.py"))["main"]
    finetune(["--checkpoint", str(golden_dir), "--data", str(data), "--mode", "sft", "--out", str(tmp_path / "sft"),
              "--steps", "2", "--batch", "2", "--seq-len", "24"])
    finetune(["--checkpoint", str(golden_dir), "--data", str(ROOT / "nld_jax" / "config.py"), "--mode", "lora",
              "--out", str(tmp_path / "lora"), "--steps", "2", "--batch", "2", "--seq-len", "32",
              "--block-sizes", "8"])
    import nld_jax

    base = nld_jax.load(golden_dir)
    for name, trained, before in (("sft", lambda m: m.params, base.params),
                                  ("lora", lambda m: {k: m.lora[k] for k in ("A", "B")},
                                   {k: base.lora[k] for k in ("A", "B")})):
        model = nld_jax.load(tmp_path / name)
        assert model.lora is not None
        changed = [not np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(trained(model)), jax.tree.leaves(before))]
        assert any(changed), f"{name}: training changed no weight"
        log = [json.loads(l) for l in open(str(tmp_path / name) + ".work/finetune_log.jsonl")]
        assert log and all(np.isfinite(r["loss"]) for r in log)
        out = nld_jax.generate(model, ["def g(x):"], mode="spec", max_new_tokens=8, use_lora=True)
        assert out.tokens[0]


# A whole notebook through a kernel (~15 s): slow step of CI.
@pytest.mark.slow
def test_colab_notebook_executes_top_to_bottom(tmp_path):
    import nbclient  # in the `test` extra: missing is a failure, not a skip
    import nbformat
    nb = nbformat.read(EXAMPLES / "colab_demo.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # the unmasking heat map, the accepted lengths and the demo VLM's picture
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "greedy spec == greedy AR: True" in text


def test_cli_chat_uses_the_chat_template(golden_dir, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path / "chat"
    shutil.copytree(golden_dir, ckpt, ignore=shutil.ignore_patterns("golden"))
    cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}[assistant] {% endif %}")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(cfg))
    import nld_jax
    from nld_jax.cli.generate import main

    model = nld_jax.load(ckpt)
    ids = model.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[0] == model.config.bos_token_id and ids.count(model.config.bos_token_id) == 1
    assert model.tokenizer.decode(ids).startswith("[user] hi\n[assistant]")
    answers = iter(["hi", "more", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert main(["--checkpoint", str(ckpt), "--chat", "--mode", "spec", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("nld> ") == 2
    assert "no chat template" not in captured.err


def _train_tasks():
    return runpy.run_path(str(EXAMPLES / "train_tasks.py"))


def _task_answer(task: str, x: str) -> str:
    """Each task as the README describes it, written here from that description."""
    if task == "copy":
        return x
    if task == "upper":
        return x.upper()
    if task == "sort":
        return " ".join(str(v) for v in sorted(int(v) for v in x.split()))
    if task == "add":
        a, b = x.split(" + ")
        return str(int(a) + int(b))
    if task == "json":
        return json.dumps({k: int(v) if v.isdigit() else v for k, v in (p.split("=") for p in x.split())})
    if task == "table":
        rows = [[p.split("=") for p in r.split()] for r in x.split("; ")]
        header = [k for k, _ in rows[0]]
        lines = ["| " + " | ".join(header) + " |", "| --- | --- |"] + ["| " + " | ".join(v for _, v in r) + " |"
                                                                      for r in rows]
        return "\n".join(lines)
    if task == "letter":
        f = dict(p.split("=") for p in x.split())
        return (f"dear {f['to']}, thank you for the {f['item']}. see you on {f['day']}. "
                f"best wishes, {f['from']}")
    raise AssertionError(f"a task the README does not describe: {task}")


def test_task_examples_are_what_their_task_says_and_held_out_ones_never_train():
    """examples/train_tasks.py: every answer is its prompt's task applied to the input; the
    held-out rule splits prompts, and the packed rows keep each example whole, its prompt out of
    the loss and its answer (with the EOS padding to a multiple of 32) in it."""
    t = _train_tasks()
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    seen = set()
    for task, prompt, answer in itertools.islice(t["examples"](0, words, held_out=False), 500):
        assert prompt.startswith(task + ": ") and prompt.endswith(" =") and answer.startswith(" ")
        x, y = prompt[len(task) + 2:-2], answer[1:]
        assert y == _task_answer(task, x), (prompt, answer)
        assert not t["is_held_out"](prompt)
        seen.add(task)
    assert seen == set(t["TASKS"])
    held = list(itertools.islice(t["examples"](10_000, words, held_out=True), 50))
    assert all(t["is_held_out"](p) for _, p, _ in held)

    import nld_jax

    tok = nld_jax.load().tokenizer
    code = [tok.encode("def f(x):\n    return x\n" * 20, add_special_tokens=False)]
    data = t["task_rows"](tok, words, code, 20, 256, 0)
    tokens, mask = data["tokens"], data["loss_mask"]
    assert tokens.shape == mask.shape == (20, 256)
    for row, m in zip(tokens, mask):
        starts = [i for i in range(256) if row[i] == tok.bos_id]
        for s in starts:
            text = tok.decode([int(v) for v in row[s + 1:]])
            head = text.split(" ", 1)[0]
            if head.endswith(":") and head[:-1] in t["TASKS"]:  # a task example: BOS prompt answer EOS...
                n_prompt = len(tok.encode(text.split(" =", 1)[0] + " =")) - 1
                assert s % 32 == 0 and not m[s:s + 1 + n_prompt].any() and m[s + 1 + n_prompt]


# Trains a 2-layer model from scratch for a few steps, its draft LoRA, and evaluates it (~1-2 min).
@pytest.mark.slow
def test_train_tasks_smoke_run_writes_a_model_and_its_report(tmp_path):
    out = tmp_path / "model"
    _train_tasks()["main"](["--out", str(out), "--size", "smoke", "--steps", "3", "--lora-minutes", "0.02",
                            "--eval-per-task", "1", "--block-lengths", "8,32", "--thresholds", "0.9"])
    import nld_jax

    model = nld_jax.load(out)
    assert model.lora is not None and model.config.vocab_size == 260
    report = json.loads((out / "train_report.json").read_text())
    modes = report["modes"]
    for name in ("ar", "diffusion_b8_t0.9", "diffusion_b32_t0.9", "spec_b32", "spec_b32_lora", "spec_quadratic_b8"):
        assert set(modes[name]["per_task"]) == set(report["tasks"]), name
        assert modes[name]["tpf"] > 0 and modes[name]["tokens_per_second"] > 0
    assert modes["spec_b32"]["equals_ar"] and modes["spec_b32_lora"]["equals_ar"]
    assert modes["spec_quadratic_b8"]["equals_ar"]
    assert report["base_steps"] == 3 and report["lora_steps"] >= 10
