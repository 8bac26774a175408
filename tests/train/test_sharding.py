"""FSDP + data-parallel sharding: 8 fake CPU devices (mesh fsdp=4, data=2) reproduce the 1-device
losses; FSDP spec rule, the projector-basis rule and the low-rank moment rule; GaLore steps with
those rules on 8 devices equal the 1-device steps; the randomized refresh of a sharded gradient
equals the 1-device one without all-gathering the gradient; bad meshes and batches fail fast
with clear messages."""

import json
import os
import subprocess
import sys

import numpy as np
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


def test_basis_spec_rule_and_projectors_in_tree_shardings():
    assert sharding.basis_spec((24, 2048, 512), 8) == PartitionSpec(None, "fsdp", None)
    # d indivisible (llama_1b's intermediate on 8 devices): split along r, else replicated
    assert sharding.basis_spec((24, 5461, 512), 8) == PartitionSpec(None, None, "fsdp")
    assert sharding.basis_spec((24, 5461, 500), 8) == PartitionSpec()
    assert sharding.basis_spec((8, 4), 8) == PartitionSpec()            # small: replicated
    import jax
    import jax.numpy as jnp

    from lrx.optim import Projector

    mesh = sharding.make_mesh(data=1, fsdp=1)
    tree = {"w": jnp.zeros((64, 96)),
            "p": Projector(jnp.zeros((2, 96, 4)), None)}
    out = sharding.tree_shardings(tree, mesh)
    assert isinstance(out["p"], Projector) and out["p"].right is None
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(tree)


def test_projected_spec_follows_the_gradient():
    """Moments of llama_1b's stacks (gradient split by fsdp_spec): the axis they keep of the
    gradient is split where the gradient is; a gradient split along the projected axis puts the
    split on r; anything else falls back to fsdp_spec."""
    import jax
    import jax.numpy as jnp

    from lrx.optim import Projector

    s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    spec = sharding.projected_spec
    fsdp = lambda axis: PartitionSpec(*[("fsdp" if a == axis else None) for a in range(3)])  # noqa: E731
    # attention (24, 2048, 2048), split along n (ties go last); right basis spans n -> r
    assert spec((24, 2048, 512), Projector(None, s(24, 2048, 512)), 8) == fsdp(2)
    # MLP gate/up (24, 2048, 5461), split along m; right basis spans n -> keep m
    assert spec((24, 2048, 512), Projector(None, s(24, 5461, 512)), 8) == fsdp(1)
    # MLP down (24, 5461, 2048), split along n; left basis spans m -> keep n
    assert spec((24, 512, 2048), Projector(s(24, 5461, 512), None), 8) == fsdp(2)
    # left basis of a gradient split along m (its projected axis) -> r
    assert spec((6, 8, 96), Projector(s(6, 128, 8), None), 4) == fsdp(1)
    # r indivisible: fsdp_spec's choice; two-sided and small: fsdp_spec
    assert spec((24, 2048, 500), Projector(None, s(24, 2048, 500)), 8) == fsdp(1)
    assert spec((6, 8, 8), Projector(s(6, 128, 8), s(6, 96, 8)), 4) == sharding.fsdp_spec(
        (6, 8, 8), 4)
    assert spec((2, 8, 8), Projector(s(2, 64, 8), None), 8) == PartitionSpec()


def test_sharded_galore_steps_equal_one_device(tmp_path):
    """8 fake devices (child process): GaLore (randomized, reverse_std) train steps of a tiny
    scanned LLaMA with the llama_1b layout in small (intermediate 132 not divisible by 8, so the
    MLP bases are split along r; attention moments split along r) equal the 1-device steps:
    losses to 1e-5 relative (measured 1.1e-7), parameters to 1e-5 (measured 2.0e-7; exact SVD
    the same, 1.1e-7 / 2.1e-7)."""
    out = tmp_path / "galore.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=xla_flags(8))
    proc = subprocess.run([sys.executable, "-m", "tests.train.sharded_galore", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = json.loads(out.read_text())
    assert record["specs"] == {"mlp_up_basis": "P(None, None, 'fsdp')",
                               "mlp_down_basis": "P(None, None, 'fsdp')",
                               "attn_q_moment": "P(None, None, 'fsdp')",
                               "mlp_up_moment": "P(None, 'fsdp', None)"}
    one, many = np.asarray(record["one_losses"]), np.asarray(record["many_losses"])
    assert len(one) == 4 and np.all(np.isfinite(one))
    np.testing.assert_allclose(many, one, rtol=1e-5)
    for a, b in zip(record["one_params"], record["many_params"], strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
    assert record["moved"] > 1e-3          # the steps changed the parameters


def test_sharded_randomized_refresh_equals_one_device_without_gathering(tmp_path):
    """8 fake devices (child process): projectors of a (2, 64, 48) gradient split along its rows
    or its columns. The randomized refresh equals the 1-device result and all-gathers at most
    one sketch-sized (d x k) array (XLA may split an all-reduce into reduce-scatter +
    all-gather), never the gradient; the exact SVD is correct under FSDP too but gathers the
    gradient. Bases orthonormal and capturing >= 99.9% of the top-r energy (NumPy float64)."""
    from tests.train import sharded_refresh as child

    out = tmp_path / "records.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=xla_flags(8))
    proc = subprocess.run([sys.executable, "-m", "tests.train.sharded_refresh", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert len(records) == len(child.CASES)
    g = child.gradient().astype(np.float64)
    grad_bytes = g.size * 4
    k = child.RANK + 4                                   # rank + oversample probes
    for r in records:
        one, many = np.asarray(r["one"]), np.asarray(r["many"])
        np.testing.assert_allclose(many, one, atol=2e-5, err_msg=str(r["method"]))
        mats = g if r["side"] == "left" else np.swapaxes(g, 1, 2)
        for b in range(child.B):
            np.testing.assert_allclose(many[b].T @ many[b], np.eye(child.RANK), atol=1e-5)
            s = np.linalg.svd(mats[b], compute_uv=False)
            captured = np.sum((many[b].T @ mats[b]) ** 2)
            assert captured >= 0.999 * np.sum(s[:child.RANK] ** 2)
        name = f"{r['method']} {r['side']} split along axis {r['axis']}"
        if r["method"] == "randomized":
            d = child.M if r["side"] == "left" else child.N
            assert r["allgather_bytes"] <= child.B * d * k * 4, name
        else:
            assert r["allgather_bytes"] >= grad_bytes, name
