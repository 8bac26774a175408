"""Sweeps in one compiled program: K replicas of a training run that differ in learning rate and/or
seed, trained as one ``vmap``-ped, jit-compiled step.

The learning rate of a replica is a hyperparameter in its optimizer state, as with
``optax.inject_hyperparams`` (through :func:`lrx.optim.engine.inject_hyperparams`): the optimizer
is built by a factory ``factory(learning_rate) -> GradientTransformation`` whose schedule is
``learning_rate * unit_schedule(t)``, so one compiled step serves every replica and a sweep of 4
learning rates costs one compilation and runs the small matmuls batched. Seeds change the
parameter initialisation and the step's PRNG key (the caller builds each replica's state).

Layout of a replica-stacked :class:`lrx.train.loop.TrainState`: every leaf has a leading replica
axis ``K`` except the integer scalars (the step and the optimizers' counters), which are the same
for every replica and stay shared (:func:`replica_axes`). Keeping the counters unbatched keeps the
GaLore/Fira/FRUGAL/APOLLO refresh a real ``lax.cond`` under ``vmap`` (a batched predicate would turn
it into a select that runs the SVD at every step).

Divergence: :func:`make_sweep_step` keeps a replica whose loss or new parameters are not finite at
its last good state and sets its learning rate to 0 (stored in its optimizer state, so it survives
checkpoint and resume); its ``alive`` metric is then 0 and the training loop reports the replica and
step while the other replicas continue.

Example (two learning rates of AdamW in one program)::

    import jax, jax.numpy as jnp, optax
    from lrx.train import loop, sweep

    def loss_fn(params, frozen, batch, rng):
        return jnp.mean((batch @ params["w"]) ** 2), {}

    factory = lambda learning_rate: optax.adam(lambda t: learning_rate * 1.0)
    lrs, seeds = (1e-3, 1e-2), (0, 0)
    states = [loop.create_state({"w": jnp.ones((4, 2))}, sweep.sweep_optimizer(factory, lr),
                                seed=s) for lr, s in zip(lrs, seeds)]
    state = sweep.stack_states(states)                 # leading replica axis K = 2
    step = jax.jit(sweep.make_sweep_step(loss_fn, sweep.sweep_optimizer(factory, lrs[0]),
                                         sweep.replica_axes(states[0])))
    state, metrics = step(state, jnp.ones((1, 3, 4)))  # metrics["loss"]: shape (2,)
    one = sweep.replica(state, 1)                      # replica 1 as a plain TrainState
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrx.optim.engine import inject_hyperparams
from lrx.train.step import make_step

PyTree = Any


def _leaf_axis(x: Any) -> int | None:
    return None if (np.ndim(x) == 0 and jnp.issubdtype(jnp.result_type(x), jnp.integer)) else 0


def replica_axes(state: PyTree) -> PyTree:
    """The ``vmap`` axes of a (single-replica or stacked) state: ``None`` (shared) for integer
    scalars (steps, optimizer counters), ``0`` (the replica axis) for every other leaf."""
    return jax.tree_util.tree_map(_leaf_axis, state)


def stack_states(states: Sequence[PyTree]) -> PyTree:
    """One state with a leading replica axis from K same-structured states (K >= 1). Shared leaves
    (:func:`replica_axes`) must be equal across the states (ValueError naming the leaf)."""
    if not states:
        raise ValueError("stack_states needs at least one state")
    flat, treedef = jax.tree_util.tree_flatten_with_path(states[0])
    columns = list(zip(*[jax.tree_util.tree_leaves(s) for s in states]))
    leaves = []
    for (path, _), column in zip(flat, columns):
        if _leaf_axis(column[0]) is None:
            values = [int(c) for c in column]
            if any(v != values[0] for v in values):
                raise ValueError(f"shared leaf {jax.tree_util.keystr(path)} differs between "
                                 f"replicas: {values}")
            leaves.append(column[0])
        else:
            leaves.append(jnp.stack([jnp.asarray(c) for c in column]))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def replica(state: PyTree, index: int) -> PyTree:
    """Replica ``index`` of a stacked state (shared leaves as they are)."""
    return jax.tree_util.tree_map(lambda x: x if _leaf_axis(x) is None else x[index], state)


def num_replicas(state: PyTree) -> int:
    """K of a stacked state (the leading axis of its first per-replica leaf)."""
    for x in jax.tree_util.tree_leaves(state):
        if _leaf_axis(x) is not None:
            return int(np.shape(x)[0])
    raise ValueError("the state has no per-replica leaf")


def sweep_optimizer(factory: Callable[[Any], optax.GradientTransformation],
                    learning_rate: float) -> optax.GradientTransformation:
    """``factory`` with ``learning_rate`` held in the optimizer state
    (``opt_state.hyperparams['learning_rate']``, a float32 scalar per replica once stacked).
    ``factory(learning_rate)`` must use its argument only through jnp arithmetic (e.g. a
    schedule ``lambda t: learning_rate * unit(t)``): it is traced."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    return inject_hyperparams(factory)(learning_rate=learning_rate)


def learning_rates(state: PyTree) -> np.ndarray:
    """The per-replica learning rates ``(K,)`` held in a stacked state's optimizer state (0 marks
    a replica stopped at divergence)."""
    return np.asarray(state.opt_state.hyperparams["learning_rate"])


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_sweep_step(loss_fn: Callable, optimizer: optax.GradientTransformation, axes: PyTree, *,
                    micro_batches: int = 1, step: Callable | None = None) -> Callable:
    """The replica-stacked train step ``(state, batch) -> (state, metrics)``.

    ``optimizer``: a :func:`sweep_optimizer` (any replica's: the learning rate is read from the
    state); ``axes``: :func:`replica_axes` of one replica's state; ``batch`` is shared by every
    replica (leading axis ``micro_batches``); ``step``: the single-replica step (default
    :func:`lrx.train.step.make_step`). Metrics have shape ``(K,)`` and include ``alive`` (1 while
    the replica trains, 0 once it diverged; see the module docstring).
    """
    single = step or make_step(loss_fn, optimizer, micro_batches=micro_batches)

    def guarded(state, batch):
        new, metrics = single(state, batch)
        lr = state.opt_state.hyperparams["learning_rate"]
        ok = jnp.isfinite(metrics["loss"]) & _all_finite(new.params) & (lr > 0)
        kept = jax.tree_util.tree_map(
            lambda n, o: n if _leaf_axis(n) is None else jnp.where(ok, n, o), new, state)
        hyper = dict(kept.opt_state.hyperparams)
        hyper["learning_rate"] = jnp.where(ok, lr, jnp.zeros_like(lr))
        kept = kept.replace(opt_state=kept.opt_state._replace(hyperparams=hyper))
        return kept, {**metrics, "alive": ok.astype(jnp.float32)}

    return jax.vmap(guarded, in_axes=(axes, None), out_axes=(axes, 0))
