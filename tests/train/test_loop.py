"""Shared training loop: exact resume, gradient accumulation, NaN stop, SIGTERM checkpoint."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrx.train import loop, sharding

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
