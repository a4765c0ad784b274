"""A training step on 8 fake devices (data, FSDP and tensor meshes) equals the one-device step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_train_step_equals_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_sharded_train_check.py")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    assert {(r["mode"], r["mesh"]) for r in report["results"]} == {
        (m, s) for m in ("pretrain", "lora") for s in ("data=8", "data=2,fsdp=4", "data=2,fsdp=2,tensor=2")}
    for r in report["results"]:
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-5), r
        assert r["moved"] > 1e-4, r  # the step changed the weights, so the comparison means something
        assert r["max_param_diff"] < 1e-5, r
    # the weights really are split (FSDP over the embed axis) on the fsdp meshes
    assert any("fsdp" in r["sharded_leaf"] for r in report["results"] if "fsdp" in r["mesh"])
