"""The README's code runs as written: every ```python block, in order, in one namespace, on the
embedded default model (a block that cannot, e.g. one that needs the 8B checkpoint, says so with
a ``# doc-test: skip (reason)`` line, and the list of those is pinned here), and the first
command of "Set up on a fresh machine" does what the README says it prints."""

from __future__ import annotations

import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"^\s*# doc-test: skip \((.+)\)\s*$", re.M)
# Blocks allowed to skip, by their first line, with the reason the block itself gives. Keep it
# short: a block that needs a real checkpoint is rewritten to run on the embedded default.
EXPECTED_SKIPS: dict[str, str] = {}


def _blocks(language: str) -> list[tuple[int, str]]:
    """(line number, code) of each fenced block of ``language``."""
    text = README.read_text()
    out = []
    for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.M | re.S):
        out.append((text.count("\n", 0, m.start()) + 2, m.group(1)))
    return out


# The sharding block runs the embedded model (3 query heads, 1 KV head) on tensor=4, which the
# README says warns and replicates the heads.
@pytest.mark.filterwarnings("ignore::nld_jax.partitioning.ShardingFallbackWarning")
def test_every_python_block_runs_in_order():
    """Bug: the README's ``block_logits(model, [[1, 6, 224]], [[340, 3, 3]])`` right after
    ``model = nld_jax.load()`` failed: the embedded model's vocabulary has 260 ids."""
    blocks = _blocks("python")
    assert len(blocks) >= 3
    namespace: dict = {"__name__": "readme"}
    skipped = {}
    for line, code in blocks:
        reason = SKIP.search(code)
        if reason:
            skipped[code.strip().splitlines()[0]] = reason.group(1)
            continue
        try:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README.md block at line {line} failed: {type(e).__name__}: {e}")
    assert skipped == EXPECTED_SKIPS, skipped
    print(f"{len(blocks) - len(skipped)} README python blocks ran, {len(skipped)} skipped")


def test_first_fresh_machine_command_prints_what_the_readme_says(capsys):
    """``nld-generate --mode all "<a task prompt>"``: the modes one after the other, each followed
    by its tokens, forwards, TPF, tokens/s and ms per forward."""
    from nld_jax.cli.generate import main

    command = next(code for _, code in _blocks("bash") if "nld-generate" in code)
    argv = shlex.split(command.split("nld-generate", 1)[1].strip())
    assert argv[:2] == ["--mode", "all"] and len(argv) == 3
    task = argv[2].split(":", 1)[0]
    assert task in ("copy", "upper", "sort", "add", "json", "table", "letter") and argv[2].endswith(" ="), argv
    assert main(argv) == 0
    err = capsys.readouterr().err
    stats = [l for l in err.splitlines() if l.startswith("[")]
    assert [l.split("]")[0][1:] for l in stats] == ["ar", "diffusion", "spec", "spec_quadratic"], err
    for l in stats:
        assert all(w in l for w in ("tokens,", "forwards", "TPF", "tokens/s", "ms per forward")), l
    assert "depend on this machine" in err
    assert "TPF = tokens per forward" in err
