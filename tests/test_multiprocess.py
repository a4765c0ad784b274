"""examples/tpu_pod_batch_generate.py: two real processes (jax.distributed on loopback, 4 CPU
devices each) write the same JSONL as one process on one device."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "data" / "nld-tiny"
SCRIPT = ROOT / "examples" / "tpu_pod_batch_generate.py"


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> pathlib.Path:
    """Text and id prompts, ragged, in the three modes with per-prompt settings."""
    with open(GOLDEN_DIR / "golden" / "cases.json") as f:
        cases = json.load(f)
    batch, spec = cases["prompts"]["batch"]["ids"], cases["prompts"]["spec"]
    rows = [
        {"id": "text-ar", "text": spec[0]["text"]},
        {"ids": batch[0][:17], "meta": {"source": "golden"}},
        {"ids": spec[1]["ids"][:9], "max_new_tokens": 10},
        {"ids": batch[1], "mode": "diffusion", "block_length": 8},
        {"text": spec[2]["text"], "mode": "diffusion", "block_length": 8},
        {"ids": spec[0]["ids"][:5], "mode": "diffusion", "block_length": 8},
        {"ids": batch[0][:30], "mode": "spec", "block_length": 8, "use_lora": True},
        {"ids": spec[1]["ids"], "mode": "spec", "block_length": 8, "use_lora": True},
    ]
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def common_args(prompts: pathlib.Path, output: pathlib.Path) -> list[str]:
    return ["--checkpoint", str(GOLDEN_DIR), "--dtype", "float32", "--input", str(prompts), "--output", str(output),
            "--batch-size", "4", "--max-new-tokens", "16"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one_process_here(prompts: pathlib.Path, output: pathlib.Path) -> None:
    """The script's main() in this (one-device) process: the single-process reference."""
    spec = importlib.util.spec_from_file_location("tpu_pod_batch_generate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(common_args(prompts, output)) == 0


def run_two_processes(prompts: pathlib.Path, output: pathlib.Path, mesh: str) -> None:
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), *common_args(prompts, output), "--mesh", mesh,
                               "--cpu-devices", "4", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                               "--process-id", str(pid)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for pid in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=480)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} failed:\n{log[-6000:]}"
    assert "2 process(es), 8 cpu devices" in logs[0] and "batch 4/4" in logs[0], logs[0][-3000:]


@pytest.fixture(scope="module")
def single(prompts_file, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("single") / "results.jsonl"
    run_one_process_here(prompts_file, out)
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_single_process_results(single):
    assert sorted(r["index"] for r in single) == list(range(8))
    by_id = {r["id"]: r for r in single}
    assert by_id["text-ar"]["mode"] == "ar" and isinstance(by_id["text-ar"]["text"], str)
    assert by_id[1]["meta"] == {"source": "golden"}
    for r in single:
        assert r["tokens"] and r["nfe"] >= 1 and r["tpf"] == pytest.approx(len(r["tokens"]) / r["nfe"], abs=1e-6)
    assert len(by_id[2]["tokens"]) <= 10  # per-prompt max_new_tokens (AR never overshoots)
    assert {r["mode"] for r in single} == {"ar", "diffusion", "spec"}


# Two fresh processes each start JAX and compile everything (~30 s): slow step of CI.
@pytest.mark.slow
def test_two_processes_write_the_same_jsonl(prompts_file, single, tmp_path):
    out = tmp_path / "results.jsonl"
    run_two_processes(prompts_file, out, "data=4,tensor=2")  # tensor pairs in a process, data across
    assert [json.loads(line) for line in out.read_text().splitlines()] == single


@pytest.mark.slow
def test_two_processes_tensor_parallel_across_processes(prompts_file, single, tmp_path):
    out = tmp_path / "results.jsonl"
    run_two_processes(prompts_file, out, "data=1,tensor=8")  # every all-reduce crosses processes
    assert [json.loads(line) for line in out.read_text().splitlines()] == single
