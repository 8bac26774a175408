"""Perceptron algorithms: the Batch Perceptron (the gamma -> infinity limit of LR+GD), its
normalized version (the limit of Normalized LR+GD) and the classical one-sample Perceptron.

Reference: A. Tyurin, "From Logistic Regression to the Perceptron Algorithm: Exploring Gradient
Descent with Large Step Sizes", arXiv 2412.08424 (2024). With ``z_i = y_i a_i`` and the set of
misclassified samples ``S_t = {i : y_i a_i^T theta_t <= 0}``:

  * Batch Perceptron (Alg. of Sec. 3, the limit in Thm 3.2): ``theta_1 = theta_0 + (1/(2n))
    sum_i z_i`` (from ``theta_0 = 0`` every ``sigma(-gamma m_i) = sigma(0) = 1/2``, hence the
    first step's factor 1/2), then ``theta_{t+1} = theta_t + (1/n) sum_{i in S_t} z_i``.
    Thm 3.3: it separates the data within ``n R^2 / mu^2`` iterations.
  * Normalized Batch Perceptron (Sec. 5-6): ``theta_{t+1} = theta_t + (1/|S_t|) sum_{i in S_t}
    z_i``; from 0 its first step is ``mean_i z_i`` (the limit of Normalized LR+GD, whose
    ``beta_0 = 2`` cancels the 1/2). Thm 5.3: at most ``R^2 / mu^2`` iterations.
  * Classical Perceptron (Rosenblatt; Novikoff's bound, Thm 5.2): cycle through the samples in
    order and update ``theta <- theta + z_i`` whenever ``z_i^T theta <= 0``; at most ``R^2/mu^2``
    updates. We count updates (the paper's iterations) and full passes (epochs).

Closed forms: :func:`batch_perceptron_bound` (Thm 3.3), :func:`perceptron_bound` (Thms 5.2,
5.3) and :func:`worst_case_iterations` (Thm 5.1's dataset: the iterate is ``theta_k = (0.25 (1 +
2 (k - 1) / n), (n - 2k) / (2n))`` and only the +1 point is misclassified until ``k > (3n + 2) /
10``).

Once ``S_t`` is empty the batch updates are zero, so iterates stay put after separation; the
trace continues to ``T`` so that it can be compared step by step with LR+GD.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class PerceptronTrace(NamedTuple):
    """Per-iteration record of a batch perceptron over ``t = 0..T``.

    Attributes:
      params: ``(T+1, d)`` iterates ``theta_t`` (``theta_0 = 0``).
      accuracy: ``(T+1,)`` fraction of samples with ``y_i a_i^T theta_t > 0``.
      mistakes: ``(T+1,)`` ``|S_t|``.
      separated: ``(T+1,)`` bool, ``S_t`` empty.
    """

    params: jax.Array
    accuracy: jax.Array
    mistakes: jax.Array
    separated: jax.Array


class PerceptronResult(NamedTuple):
    """Result of the classical one-sample Perceptron.

    Attributes:
      params: ``(d,)`` final ``theta``.
      updates: number of updates (mistakes) made.
      epochs: number of full passes, including the final mistake-free pass when converged.
      converged: whether a full pass made no mistake (the data are separated).
    """

    params: jax.Array
    updates: jax.Array
    epochs: jax.Array
    converged: jax.Array


def batch_step(theta: jax.Array, features: jax.Array, labels: jax.Array, *,
               normalized: bool | jax.Array = False, first: bool | jax.Array = False
               ) -> jax.Array:
    """One Batch Perceptron step: ``theta + c * sum_{i in S} y_i a_i`` -> ``(d,)``.

    ``c = 1/n`` (times 1/2 when ``first``) or, if ``normalized``, ``1/|S|`` (0 when S is empty).
    ``theta (d,)``, ``features (n, d)``, ``labels (n,)``; the flags may be traced booleans.
    """
    n = features.shape[0]
    wrong = (labels * (features @ theta) <= 0).astype(features.dtype)
    total = (wrong * labels) @ features
    plain = jnp.where(first, 0.5, 1.0) / n
    scale = jnp.where(normalized, 1.0 / jnp.maximum(jnp.sum(wrong), 1.0), plain)
    return theta + scale.astype(features.dtype) * total


def _batch_run(features, labels, normalized, num_steps: int) -> PerceptronTrace:
    def step(theta, t):
        m = labels * (features @ theta)
        wrong = jnp.sum(m <= 0)
        new = batch_step(theta, features, labels, normalized=normalized, first=t == 0)
        return new, (theta, jnp.mean(m > 0), wrong, wrong == 0)

    theta0 = jnp.zeros(features.shape[1], features.dtype)
    _, outs = jax.lax.scan(step, theta0, jnp.arange(num_steps + 1))
    return PerceptronTrace(*outs)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _batch(features, labels, flags, num_steps: int) -> PerceptronTrace:
    return jax.vmap(lambda f: _batch_run(features, labels, f, num_steps))(flags)


def batch_perceptron(features: jax.Array, labels: jax.Array, num_steps: int, *,
                     normalized: bool = False) -> PerceptronTrace:
    """``num_steps`` iterations of the (Normalized) Batch Perceptron from ``theta_0 = 0``.

    Args:
      features: ``(n, d)``.
      labels: ``(n,)`` in ``{-1, +1}``.
      num_steps: ``T >= 0``.
      normalized: use ``1/|S_t|`` instead of ``1/n`` (and no 1/2 on the first step).
    Returns:
      :class:`PerceptronTrace` over ``t = 0..T``.
    """
    trace = batch_perceptrons(features, labels, num_steps, normalized=(bool(normalized),))
    return jax.tree_util.tree_map(lambda v: v[0], trace)


def batch_perceptrons(features: jax.Array, labels: jax.Array, num_steps: int, *,
                      normalized: tuple[bool, ...] = (False, True)) -> PerceptronTrace:
    """Several Batch Perceptron variants in one compiled ``vmap`` (leading axis = variants).

    Args:
      normalized: one flag per variant (default: plain and normalized).
    Returns:
      :class:`PerceptronTrace` with a leading axis ``len(normalized)``.
    """
    features = jnp.asarray(features)
    labels = jnp.asarray(labels, features.dtype)
    _check(features, labels)
    if int(num_steps) < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
    return _batch(features, labels, jnp.asarray(normalized, bool), int(num_steps))


@functools.partial(jax.jit, static_argnames=("max_epochs",))
def _classical(features, labels, max_epochs: int) -> PerceptronResult:
    def one_pass(theta):
        def visit(carry, sample):
            th, count = carry
            a, y = sample
            wrong = y * (a @ th) <= 0
            return (jnp.where(wrong, th + y * a, th), count + wrong.astype(jnp.int32)), None

        (theta, count), _ = jax.lax.scan(visit, (theta, jnp.int32(0)), (features, labels))
        return theta, count

    def cond(state):
        _, _, epochs, last = state
        return (epochs < max_epochs) & (last > 0)

    def body(state):
        theta, updates, epochs, _ = state
        theta, count = one_pass(theta)
        return theta, updates + count, epochs + 1, count

    theta0 = jnp.zeros(features.shape[1], features.dtype)
    theta, updates, epochs, last = jax.lax.while_loop(
        cond, body, (theta0, jnp.int32(0), jnp.int32(0), jnp.int32(1)))
    return PerceptronResult(theta, updates, epochs, last == 0)


def perceptron(features: jax.Array, labels: jax.Array, *, max_epochs: int = 1000
               ) -> PerceptronResult:
    """The classical Perceptron: cyclic passes over the samples, ``theta += y_i a_i`` on a mistake.

    Args:
      features: ``(n, d)``.
      labels: ``(n,)`` in ``{-1, +1}``.
      max_epochs: stop after this many passes even if not converged.
    """
    features = jnp.asarray(features)
    labels = jnp.asarray(labels, features.dtype)
    _check(features, labels)
    if int(max_epochs) < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}.")
    return _classical(features, labels, int(max_epochs))


def _check(features, labels) -> None:
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError("the dataset is empty or not an (n, d) matrix (features "
                         f"{features.shape}); need n >= 1 samples with d >= 1 features.")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must have shape ({features.shape[0]},), got {labels.shape}.")


def _check_geometry(radius: float, margin: float) -> None:
    if not (radius > 0 and margin > 0 and margin <= radius):
        raise ValueError(f"need a radius R > 0 and a margin 0 < mu <= R, got R={radius}, "
                         f"mu={margin}.")


def batch_perceptron_bound(n: int, radius: float, margin: float) -> float:
    """Thm 3.3: the Batch Perceptron separates ``n`` samples of radius ``R = max_i ||a_i||`` and
    margin ``mu`` within ``n R^2 / mu^2`` iterations."""
    _check_geometry(radius, margin)
    return n * radius**2 / margin**2


def perceptron_bound(radius: float, margin: float) -> float:
    """Thms 5.2 (classical Perceptron, Novikoff) and 5.3 (Normalized Batch Perceptron): at most
    ``R^2 / mu^2`` iterations (updates for the classical one)."""
    _check_geometry(radius, margin)
    return radius**2 / margin**2


def worst_case_iterations(n: int) -> int:
    """Iterations the Batch Perceptron needs on :func:`lrx.data.separable.worst_case` ``(n)``
    (Thm 5.1): ``floor((3n + 2) / 10) + 1``, linear in ``n``."""
    if n < 2:
        raise ValueError(f"the worst-case dataset needs n >= 2 samples, got {n}.")
    return math.floor((3 * n + 2) / 10) + 1
