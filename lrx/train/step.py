"""The train state and the jit-able train step (gradient accumulation over micro-batches) that
:mod:`lrx.train.loop` runs and :mod:`lrx.train.sweep` vmaps; re-exported by ``lrx.train.loop``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any
LossFn = Callable[[PyTree, PyTree, PyTree, jax.Array], tuple[jax.Array, dict]]


class TrainState(flax.struct.PyTreeNode):
    """Everything a step reads and writes: ``step`` (int32 scalar), trainable ``params``,
    ``frozen`` (non-trainable arrays, e.g. LoRA bases), ``opt_state`` and ``rng`` (a raw uint32
    PRNG key, so checkpoints hold plain arrays)."""

    step: jax.Array
    params: PyTree
    frozen: PyTree
    opt_state: PyTree
    rng: jax.Array


def create_state(params: PyTree, optimizer: optax.GradientTransformation, *, seed: int,
                 frozen: PyTree = None, opt_state: PyTree = None) -> TrainState:
    """A fresh TrainState at step 0 (``opt_state``: an already built optimizer state, e.g.
    :func:`lrx.train.per_layer.make_per_layer_step`'s ``init(params)``; default
    ``optimizer.init(params)``)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      frozen={} if frozen is None else frozen,
                      opt_state=optimizer.init(params) if opt_state is None else opt_state,
                      rng=jax.random.key_data(jax.random.key(seed)))


def make_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
              micro_batches: int = 1) -> Callable[[TrainState, PyTree], tuple[TrainState, dict]]:
    """The train step ``(state, batch) -> (state, metrics)``.

    ``batch`` leaves have a leading ``micro_batches`` axis; gradients are averaged over it with a
    ``lax.scan`` (memory of one micro-batch). ``loss_fn(params, frozen, micro_batch, rng)`` returns
    ``(loss, aux)``; the step's metrics are the mean loss, the gradient global norm and the means of
    ``aux``.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
        rng, step_rng = jax.random.split(jax.random.wrap_key_data(state.rng))

        def accumulate(carry, xs):
            grads_sum, loss_sum = carry
            index, micro = xs
            (loss, aux), grads = grad_fn(state.params, state.frozen, micro,
                                         jax.random.fold_in(step_rng, index))
            grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, grads)
            return (grads_sum, loss_sum + loss), aux

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        (grads, loss), aux = jax.lax.scan(accumulate, (zeros, jnp.zeros((), jnp.float32)),
                                          (jnp.arange(micro_batches), batch))
        grads = jax.tree_util.tree_map(lambda g: g / micro_batches, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss / micro_batches, "grad_norm": optax.global_norm(grads)}
        metrics.update({k: jnp.mean(v) for k, v in aux.items()})
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  rng=jax.random.key_data(rng))
        return new_state, metrics

    return step
