"""FSDP + data-parallel sharding: 8 fake CPU devices (mesh fsdp=4, data=2) reproduce the 1-device
losses; FSDP spec rule; bad meshes and batches fail fast with clear messages."""

import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec

from lrx.train import sharding
from tests.conftest import ROOT, xla_flags

COMMON = ["--config=configs/adamw.py:smoke", "--config.train.steps=5",
          "--config.train.batch_size=8", "--config.train.eval_windows=8",
          "--config.train.log_every=1"]


def _run(workdir, *args, devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(devices))
    return subprocess.run([sys.executable, "run.py", *COMMON, f"--workdir={workdir}", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


@pytest.mark.slow  # two run.py processes (~65 s on 2 loaded cores); the default suite checks the
# same 8-device fsdp=4 x data=2 vs 1-device AdamW losses in tests/experiments/test_lm_multidevice.py
def test_eight_fake_devices_fsdp4_data2_match_one_device(tmp_path):
    one = _run(tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    eight = _run(tmp_path / "eight", "--config.mesh.fsdp=4", "--config.mesh.data=2", devices=8)
    assert eight.returncode == 0, eight.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "eight")
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        assert abs(x - y) <= 1e-5 * abs(x)
    summary = json.loads((tmp_path / "eight" / "summary.json").read_text())
    assert summary["mesh"] == {"data": 2, "fsdp": 4}


@pytest.mark.parametrize("args,devices,message", [
    (["--config.mesh.data=3"], 1, "mesh data=3 x fsdp=1 = 3 devices, but 1 are available"),
    (["--config.train.batch_size=6", "--config.mesh.fsdp=4"], 8,
     "not divisible by the data-parallel size 8"),
    (["--config.model.preset=llama_13b"], 1, "model.preset='llama_13b' is not valid"),
    (["--config.optimizer.lr=0.1"], 1, "Did you mean 'eps'|has no key 'lr'"),
])
def test_bad_input_fails_fast_with_one_clear_line(tmp_path, args, devices, message):
    out = _run(tmp_path, *args, devices=devices)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    import re

    assert re.search(message, out.stderr), out.stderr[-2000:]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_fsdp_spec_rule():
    assert sharding.fsdp_spec((512, 1376), 4) == PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((1376, 512), 4) == PartitionSpec("fsdp", None)
    assert sharding.fsdp_spec((6, 128, 128), 4) == PartitionSpec(None, None, "fsdp")
    assert sharding.fsdp_spec((128,), 4) == PartitionSpec()        # small: replicated
    assert sharding.fsdp_spec((1023, 1025), 4) == PartitionSpec()  # no axis divides
    assert sharding.fsdp_spec((512, 512), 1) == PartitionSpec()
