"""A compact training loop for small synthetic problems: the whole run is ``lax.scan`` over steps,
compiled once, with fresh batches generated inside ``jit`` from ``(key, step)``.

Use it when data are synthetic and a step is tiny (in-context regression, S4 toy tasks, linear
models); use :mod:`lrx.train.loop` (checkpoints, sharding, metrics files) for real training runs.
:func:`fit_replicas` trains K independent runs (seeds) of the same program as one ``vmap``-ped scan.
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
    # one replica of fit_replicas (the same compiled scan with a replica axis of size 1)
    stacked = jax.tree_util.tree_map(lambda x: jnp.asarray(x)[None], params)
    per_block = None if callback is None else (lambda t, losses: callback(t, float(losses[0])))
    trained, history = fit_replicas(loss_fn, stacked, optimizer, batch_fn, steps,
                                    keys=jnp.asarray(key)[None], log_every=log_every,
                                    callback=per_block)
    return (jax.tree_util.tree_map(lambda x: x[0], trained),
            {"step": history["step"], "loss": history["loss"][:, 0]})


def _check_counts(steps: int, log_every: int) -> None:
    if steps <= 0:
        raise ValueError(f"steps must be > 0, got {steps}")
    if log_every <= 0:
        raise ValueError(f"log_every must be > 0, got {log_every}")


def fit_replicas(
    loss_fn: Callable[..., jax.Array],
    params: PyTree,
    optimizer: optax.GradientTransformation,
    batch_fn: Callable[[jax.Array], PyTree],
    steps: int,
    *,
    keys: jax.Array,
    constants: PyTree = None,
    log_every: int = 100,
    callback: Callable[[int, jax.Array], None] | None = None,
) -> tuple[PyTree, dict[str, jax.Array]]:
    """K independent runs of :func:`fit` (e.g. K seeds) as one ``vmap``-ped, compiled scan.

    Replica ``k`` is the run ``fit(loss_fn, params[k], optimizer, batch_fn, steps, key=keys[k])``
    (to float tolerance: the batched matmuls may sum in another order). The optimizer's integer
    scalar counters are shared by the replicas (:func:`lrx.train.sweep.replica_axes`), so a
    GaLore-style projector refresh stays a real ``lax.cond`` instead of a select that would run
    the decomposition at every step.

    Args:
      loss_fn: ``loss_fn(params, batch)``, or ``loss_fn(params, batch, constants)`` when
        ``constants`` is given; a scalar.
      params: every leaf with a leading replica axis ``K``.
      optimizer: an optax transformation (the same for every replica).
      batch_fn: as in :func:`fit`; replica ``k``'s batch of step ``t`` is
        ``batch_fn(fold_in(keys[k], t))``.
      steps, log_every: as in :func:`fit`.
      keys: ``(K,)`` PRNG keys, one data stream per replica.
      constants: optional pytree with a leading axis ``K`` of per-replica values that are not
        trained (e.g. a frozen random base of LoRA, drawn from the replica's seed).
      callback: called after each block as ``callback(step, mean_losses)`` (``(K,)`` array).
    Returns:
      ``(params, history)``: params with the leading axis ``K``; ``history = {'step': (B,),
      'loss': (B, K)}`` (block means per replica).

    Example (two seeds of least squares)::

        ws = jnp.stack([jnp.zeros((3, 1)), jnp.ones((3, 1))])
        keys = jax.random.split(jax.random.key(0), 2)
        ws, hist = fit_replicas(loss_fn, ws, optax.adam(1e-2), batch_fn, 100, keys=keys)
        hist["loss"].shape  # (1, 2)
    """
    from lrx.train.sweep import replica_axes, stack_states

    _check_counts(steps, log_every)
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError("fit_replicas needs at least one parameter leaf")
    k = int(jnp.shape(leaves[0])[0]) if jnp.ndim(leaves[0]) else 0
    for name, tree in (("params", params), ("constants", constants), ("keys", keys)):
        for x in jax.tree_util.tree_leaves(tree):
            if jnp.ndim(x) == 0 or jnp.shape(x)[0] != k:
                raise ValueError(f"every leaf of {name} needs the leading replica axis K={k}; "
                                 f"got a leaf of shape {jnp.shape(x)}")
    if k == 0:
        raise ValueError("fit_replicas needs K >= 1 replicas (a leading axis on every leaf)")
    states = [optimizer.init(jax.tree_util.tree_map(lambda x, i=i: x[i], params))
              for i in range(k)]
    state, axes = stack_states(states), replica_axes(states[0])
    with_constants = constants is not None

    def one_step(p, s, c, key, step):
        batch = batch_fn(jax.random.fold_in(key, step))
        args = (batch, c) if with_constants else (batch,)
        loss, grads = jax.value_and_grad(loss_fn)(p, *args)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    batched = jax.vmap(one_step, in_axes=(0, axes, 0, 0, None), out_axes=(0, axes, 0))

    @functools.partial(jax.jit, static_argnums=2)
    def block(p, s, n, start, c, ks):
        def body(carry, step):
            p, s = carry
            p, s, loss = batched(p, s, c, ks, step)
            return (p, s), loss

        (p, s), losses = jax.lax.scan(body, (p, s), start + jnp.arange(n))
        return p, s, jnp.mean(losses, axis=0)

    history_steps, history_loss = [], []
    done = 0
    while done < steps:
        n = min(log_every, steps - done)
        params, state, loss = block(params, state, n, jnp.asarray(done), constants, keys)
        done += n
        history_steps.append(done)
        history_loss.append(loss)
        if callback is not None:
            callback(done, loss)
    return params, {"step": jnp.asarray(history_steps), "loss": jnp.stack(history_loss)}
