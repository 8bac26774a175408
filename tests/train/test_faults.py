"""Faults of the training loop: signals (checkpoint at the next step boundary; exit at once, naming
the step, when none comes within the grace period or a second signal arrives) and damaged
checkpoints (fall back to the newest one that restores, moving the broken one aside).

The signal tests run the loop in a subprocess (with a timeout, so a hang fails instead of stalling)
and send real signals from outside, as ``timeout`` or a scheduler would."""

import json
import os
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrx.train import loop, sharding
from tests.conftest import ROOT
from tests.train.test_loop import _train, assert_same_run

CHILD = r"""
import json, os, sys, threading, time
import jax.numpy as jnp, optax
from lrx.train import loop, sharding
from tests.train.test_loop import _batch_fn, _loss_fn

workdir, mode, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])

def hook(step, state, batch):
    with open(os.path.join(workdir, "progress"), "a") as f:
        f.write(f"{step}\n")
    if mode == "hang" and step == 3:
        threading.Event().wait()   # a step that never finishes (like a deadlocked LAPACK call)
    time.sleep(0.05)
    return state, None

opt = optax.adam(0.05)
state = loop.create_state({"w": jnp.zeros((4, 3))}, opt, seed=3)
out = loop.train(workdir=workdir, state=state, loss_fn=_loss_fn, optimizer=opt,
                 batch_fn=_batch_fn, total_steps=100000, mesh=sharding.make_mesh(), log_every=1,
                 checkpoint_every=2, hooks=[hook], progress=False, tensorboard=False,
                 stop_grace_seconds=grace)
print(json.dumps({"stopped_by": out["stopped_by"], "step": int(out["state"].step)}))
"""


def _start(workdir, mode, grace):
    os.makedirs(workdir, exist_ok=True)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, "-c", CHILD, str(workdir), mode, str(grace)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_step(proc, workdir, step, timeout=120):
    path = os.path.join(workdir, "progress")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and str(step) in open(path).read().split():
            return
        if proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"child never reached step {step}")


def _finish(proc, timeout=60):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"the run did not exit within {timeout} s of the signal") from None
    return proc.returncode, out, err


def test_sigterm_from_outside_checkpoints_at_the_next_step(tmp_path):
    proc = _start(tmp_path, "run", 60)
    _wait_for_step(proc, tmp_path, 5)
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc)
    assert rc == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped_by"] == "SIGTERM" and result["step"] >= 5
    assert loop.latest_checkpoint_step(str(tmp_path)) == result["step"]


def test_hung_step_exits_after_the_grace_period_naming_the_step(tmp_path):
    proc = _start(tmp_path, "hang", 1.5)
    _wait_for_step(proc, tmp_path, 3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, _, err = _finish(proc)
    elapsed = time.monotonic() - t0
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert 1.4 <= elapsed < 30, elapsed
    lines = [line for line in err.splitlines() if line.startswith("lrx:")]
    assert len(lines) == 1, err[-3000:]
    assert ("SIGTERM received during step 3 (2 steps done); no step boundary within 1.5 s"
            in lines[0])
    assert "Last good checkpoint: step 2" in lines[0]
    # the last good checkpoint is intact: a rerun resumes from it
    assert loop.latest_checkpoint_step(str(tmp_path)) == 2
    resumed = _train(tmp_path, 4)
    assert resumed["resumed_from"] == 2 and int(resumed["state"].step) == 4


def test_second_signal_exits_at_once(tmp_path):
    proc = _start(tmp_path, "hang", 600)
    _wait_for_step(proc, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rc, _, err = _finish(proc)
    assert rc == 128 + signal.SIGINT, err[-3000:]
    assert time.monotonic() - t0 < 20
    assert "second signal (SIGINT)" in err and "Last good checkpoint: step 2" in err


def _truncate_files(directory):
    files = [os.path.join(d, f) for d, _, fs in os.walk(directory) for f in fs]
    for path in files:
        size = os.path.getsize(path)
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    return files


def test_damaged_latest_checkpoint_falls_back_and_resumes_bit_identically(tmp_path, caplog):
    straight = _train(tmp_path / "a", 6)
    _train(tmp_path / "b", 4, checkpoint_every=2)
    ckpt = tmp_path / "b" / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["2", "4"]
    assert _truncate_files(ckpt / "4")
    with caplog.at_level("WARNING", logger="lrx.train"):
        resumed = _train(tmp_path / "b", 6)
    assert resumed["resumed_from"] == 2
    warnings = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
    assert len(warnings) == 1 and "step 4" in warnings[0], warnings
    moved = tmp_path / "b" / "checkpoints.broken" / "4"
    assert resumed["broken_checkpoints"] == [str(moved)] and moved.is_dir()  # kept, not deleted
    assert_same_run(straight, resumed, tmp_path / "b", 6)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # orbax's reader
def test_no_restorable_checkpoint_is_one_clear_error_and_moves_nothing(tmp_path):
    _train(tmp_path, 2)
    opt = optax.adam(0.05)
    state = loop.create_state({"w": jnp.zeros((5, 3))}, opt, seed=3)  # another shape
    with pytest.raises(loop.CheckpointMismatch, match="no checkpoint in .* restores into this "
                       "run's state.*new --workdir.*train.resume=False"):
        loop.train(workdir=str(tmp_path), state=state, loss_fn=lambda *a: (0.0, {}),
                   optimizer=opt, batch_fn=lambda s: np.zeros((8, 7), np.float32),
                   total_steps=4, mesh=sharding.make_mesh(),
                   progress=False, tensorboard=False)
    assert os.listdir(tmp_path / "checkpoints") == ["2"]
    assert not (tmp_path / "checkpoints.broken").exists()


def test_training_limits_blas_threads_without_environment_variables(tmp_path):
    from threadpoolctl import threadpool_info, threadpool_limits

    with threadpool_limits(limits=2, user_api="blas"):  # restored afterwards
        _train(tmp_path, 1)
        pools = [p for p in threadpool_info() if p["user_api"] == "blas"]
        assert pools and all(p["num_threads"] == 1 for p in pools), pools
