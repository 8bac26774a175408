"""A compact training loop for small synthetic problems: the whole run is ``lax.scan`` over steps,
compiled once, with fresh batches generated inside ``jit`` from ``(key, step)``.

Use it when data are synthetic and a step is tiny (in-context regression, S4 toy tasks, linear
models); use :mod:`lrx.train.loop` (checkpoints, sharding, metrics files) for real training runs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def fit(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    params: PyTree,
    optimizer: optax.GradientTransformation,
    batch_fn: Callable[[jax.Array], PyTree],
    steps: int,
    *,
    key: jax.Array,
    log_every: int = 100,
    callback: Callable[[int, float], None] | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """Trains ``params`` for ``steps`` steps of ``optimizer`` on ``loss_fn(params, batch)``.

    Args:
      loss_fn: scalar loss of ``(params, batch)``.
      params: initial parameters (any pytree).
      optimizer: an optax transformation.
      batch_fn: ``batch_fn(key) -> batch``, traced inside jit; the key of step ``t`` is
        ``jax.random.fold_in(key, t)``, so a run is a pure function of ``(key, steps)``.
      steps: number of steps (> 0).
      key: PRNG key for the data.
      log_every: the loss history is recorded as the mean over each block of ``log_every`` steps
        (the scan is compiled once per block size; steps need not be a multiple).
      callback: called on the host after each block as ``callback(step, mean_loss)``.
    Returns:
      ``(params, history)`` with ``history = {'step': (B,), 'loss': (B,)}`` (B = number of blocks).
    """
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    if log_every <= 0:
        raise ValueError(f"log_every must be > 0, got {log_every}")

    def one_step(carry, step):
        p, s = carry
        batch = batch_fn(jax.random.fold_in(key, step))
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, s = optimizer.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), loss

    @functools.partial(jax.jit, static_argnums=2)
    def block(p, s, n, start):
        (p, s), losses = jax.lax.scan(one_step, (p, s), start + jnp.arange(n))
        return p, s, jnp.mean(losses)

    state = optimizer.init(params)
    history_steps, history_loss = [], []
    done = 0
    while done < steps:
        n = min(log_every, steps - done)
        params, state, loss = block(params, state, n, jnp.asarray(done))
        done += n
        history_steps.append(done)
        history_loss.append(loss)
        if callback is not None:
            callback(done, float(loss))
    return params, {"step": jnp.asarray(history_steps), "loss": jnp.stack(history_loss)}
