"""benchmarks/forward_profile.py runs end to end at a tiny size and prints every phase."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_forward_profile_smoke(capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import forward_profile
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    tables = forward_profile.main(["--size", "tiny", "--blocks", "1,2", "--repeats", "1", "--long-cache", "128",
                                   "--new-tokens", "16"])
    phases = [row.phase for _, rows in tables for row in rows]
    for mode in ("ar", "diffusion", "spec", "spec_quadratic"):
        assert any(p.startswith(f"(d) {mode}: one loop.step") for p in phases), mode
    out = capsys.readouterr().out
    assert "| phase | ms | share of the forward | floor ms | x floor |" in out
    assert all(row.ms > 0 for _, rows in tables for row in rows if "overhead" not in row.phase)
