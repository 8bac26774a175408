"""lrx.train.loop: exact resume, gradient accumulation, the lagged NaN check (first bad step
named, no non-finite checkpoint), SIGTERM checkpoint, and faults: signals (checkpoint at the next
step boundary; exit at once, naming the step, when none comes within the grace period or a second
signal arrives) and damaged checkpoints (fall back to the newest one that restores, moving the
broken one aside).

The signal-fault tests run the loop in a subprocess (with a timeout, so a hang fails instead of
stalling) and send real signals from outside, as ``timeout`` or a scheduler would."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrx.train import loop, sharding
from tests.conftest import ROOT

W_TRUE = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def _batch_fn(step):
    rng = np.random.default_rng([7, step])
    x = rng.normal(size=(8, 4)).astype(np.float32)
    return np.concatenate([x, x @ W_TRUE], axis=1)


def _loss_fn(params, frozen, batch, rng):
    x, y = batch[:, :4], batch[:, 4:]
    noise = 1e-3 * jax.random.normal(rng, ())  # exercises the state's RNG stream
    mse = jnp.mean((x @ params["w"] - y) ** 2)
    return mse + noise, {"mse": mse}


def _train(workdir, steps, *, lr=0.05, micro_batches=1, hooks=(), opt=None, **kw):
    opt = opt or optax.adam(lr)
    state = loop.create_state({"w": jnp.zeros((4, 3))}, opt, seed=3)
    return loop.train(workdir=str(workdir), state=state, loss_fn=_loss_fn, optimizer=opt,
                      batch_fn=_batch_fn, total_steps=steps, mesh=sharding.make_mesh(),
                      micro_batches=micro_batches, log_every=1, hooks=hooks,
                      progress=False, tensorboard=False, **kw)


def test_resume_is_bit_identical(tmp_path):
    straight = _train(tmp_path / "a", 6)
    _train(tmp_path / "b", 3)
    resumed = _train(tmp_path / "b", 6)
    assert resumed["resumed_from"] == 3 and resumed["steps_run"] == 3
    assert_same_run(straight, resumed, tmp_path / "b", 6)


def assert_same_run(straight, resumed, workdir, steps):
    """A resumed run ends bit-identical to an uninterrupted one, and its metrics.jsonl holds each
    of the ``steps`` steps once."""
    np.testing.assert_array_equal(np.asarray(straight["state"].params["w"]),
                                  np.asarray(resumed["state"].params["w"]))
    np.testing.assert_array_equal(np.asarray(straight["state"].rng),
                                  np.asarray(resumed["state"].rng))
    logged = [r["step"] for r in loop.read_metrics(workdir) if "loss" in r]
    assert logged == list(range(1, steps + 1))


def test_gradient_accumulation_equals_full_batch_for_plain_sgd(tmp_path):
    # mean of micro-batch gradients == full-batch gradient for a mean loss over equal halves
    def loss_fn(params, frozen, batch, rng):
        x, y = batch[:, :4], batch[:, 4:]
        return jnp.mean((x @ params["w"] - y) ** 2), {}

    opt = optax.sgd(0.1)
    results = []
    for micro in (1, 2, 4):
        state = loop.create_state({"w": jnp.zeros((4, 3))}, opt, seed=0)
        out = loop.train(workdir=str(tmp_path / f"m{micro}"), state=state, loss_fn=loss_fn,
                         optimizer=opt, batch_fn=_batch_fn, total_steps=3,
                         mesh=sharding.make_mesh(), micro_batches=micro, progress=False,
                         tensorboard=False)
        results.append(np.asarray(out["state"].params["w"]))
    # independent float64 reference: three full-batch SGD steps
    w = np.zeros((4, 3))
    for step in range(3):
        b = _batch_fn(step).astype(np.float64)
        x, y = b[:, :4], b[:, 4:]
        w -= 0.1 * 2 * x.T @ (x @ w - y) / y.size
    for r in results:
        np.testing.assert_allclose(r, w, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(loop.NonFiniteLoss, match="at step") as info:
        _train(tmp_path, 200, opt=optax.sgd(50.0), checkpoint_every=1)
    bad = info.value.step
    last = loop.latest_checkpoint_step(str(tmp_path))
    assert last is not None and last <= bad


def test_sigterm_saves_a_checkpoint_and_returns(tmp_path):
    def send_sigterm(step, state, batch):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return state, None

    out = _train(tmp_path, 10, hooks=[send_sigterm])
    assert out["stopped_by"] == "SIGTERM"
    assert int(out["state"].step) == 2
    assert loop.latest_checkpoint_step(str(tmp_path)) == 2


def test_tree_bytes_is_exact():
    tree = {"a": jnp.zeros((3, 5), jnp.float32), "b": jnp.zeros((7,), jnp.bfloat16),
            "c": (jnp.zeros((), jnp.int32),)}
    assert loop.tree_bytes(tree) == 3 * 5 * 4 + 7 * 2 + 4


def _poisoned(bad_step):
    """A batch_fn/loss_fn pair whose loss (and gradient) is NaN at step ``bad_step`` only."""
    def batch_fn(step):
        flag = np.full((8, 1), float(step == bad_step), np.float32)
        return np.concatenate([_batch_fn(step), flag], axis=1)

    def loss_fn(params, frozen, batch, rng):
        x, y, flag = batch[:, :4], batch[:, 4:7], batch[:, 7]
        mse = jnp.mean((x @ params["w"] - y) ** 2)
        return jnp.where(jnp.max(flag) > 0, jnp.nan, 1.0) * mse, {}

    return batch_fn, loss_fn


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_lagged_nan_check_names_the_first_bad_step_and_keeps_the_last_good_checkpoint(
        tmp_path, lag):
    batch_fn, loss_fn = _poisoned(5)
    opt = optax.sgd(0.01)
    state = loop.create_state({"w": jnp.zeros((4, 3))}, opt, seed=0)
    with pytest.raises(loop.NonFiniteLoss, match="non-finite loss nan at step 5") as info:
        loop.train(workdir=str(tmp_path), state=state, loss_fn=loss_fn, optimizer=opt,
                   batch_fn=batch_fn, total_steps=9, mesh=sharding.make_mesh(), log_every=1,
                   checkpoint_every=2, metrics_lag=lag, progress=False, tensorboard=False)
    assert info.value.step == 5
    # steps 0..4 are good: the checkpoint at 4 holds them; 6 (after the NaN) was never written
    assert loop.latest_checkpoint_step(str(tmp_path)) == 4
    assert [r["step"] for r in loop.read_metrics(str(tmp_path)) if "loss" in r] == [1, 2, 3, 4, 5]
    # the kept checkpoint restores to finite parameters and resumes past nothing bad
    good_state = loop.create_state({"w": jnp.zeros((4, 3))}, opt, seed=0)
    clean = loop.train(workdir=str(tmp_path), state=good_state, loss_fn=_poisoned(-1)[1],
                       optimizer=opt, batch_fn=_poisoned(-1)[0], total_steps=6,
                       mesh=sharding.make_mesh(), progress=False, tensorboard=False)
    assert clean["resumed_from"] == 4
    assert np.all(np.isfinite(np.asarray(clean["state"].params["w"])))


def test_metrics_are_read_a_step_behind_the_device(tmp_path, monkeypatch):
    # with metrics_lag=1 the host reads step t's metrics only after step t+1 was dispatched (the
    # hooks run after each dispatch), except the last step, read at the end
    events = []
    fetch = loop._StepMetrics.fetch

    def spy(self, metrics):
        events.append(("read", len([e for e in events if e[0] == "read"]) + 1))
        return fetch(self, metrics)

    def hook(step, state, batch):
        events.append(("dispatched", step))
        return state, None

    monkeypatch.setattr(loop._StepMetrics, "fetch", spy)
    out = _train(tmp_path, 5, hooks=[hook], metrics_lag=1)
    assert out["steps_run"] == 5 and len(out["history"]) == 5
    for read in range(1, 5):
        assert events.index(("dispatched", read + 1)) < events.index(("read", read))
    assert events[-1] == ("read", 5)


def test_a_checkpoint_never_holds_a_non_finite_state(tmp_path):
    # the update after step 3 turns the weights to inf while every loss so far was finite: the
    # save at step 4 refuses, naming step 3, and the checkpoint at step 2 stays the last one
    def poison_after_three(updates, state, params=None):
        count = state + 1
        updates = jax.tree.map(lambda u: jnp.where(count == 4, jnp.inf, u), updates)
        return updates, count

    opt = optax.chain(optax.sgd(0.01), optax.GradientTransformation(
        lambda params: jnp.zeros((), jnp.int32), poison_after_three))
    state = loop.create_state({"w": jnp.zeros((4, 3))}, opt, seed=0)
    with pytest.raises(loop.NonFiniteLoss, match="non-finite state at step 3"):
        loop.train(workdir=str(tmp_path), state=state, loss_fn=_loss_fn, optimizer=opt,
                   batch_fn=_batch_fn, total_steps=8, mesh=sharding.make_mesh(),
                   checkpoint_every=2, progress=False, tensorboard=False)
    assert loop.latest_checkpoint_step(str(tmp_path)) == 2


# --------------------------------------------------------------------------------------------
# Faults

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
