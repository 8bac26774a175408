"""Logistic regression by full-batch gradient descent at any step size, vectorised over step sizes.

Reference: A. Tyurin, "From Logistic Regression to the Perceptron Algorithm: Exploring Gradient
Descent with Large Step Sizes", arXiv 2412.08424 (2024). Notation of the paper:

  * data ``a_i in R^d``, ``y_i in {-1, +1}``; margins ``m_i(theta) = y_i a_i^T theta``;
  * logistic loss ``f(theta) = (1/n) sum_i log(1 + exp(-m_i))``;
  * gradient ``grad f(theta) = -(1/n) sum_i sigma(-m_i) y_i a_i`` with ``sigma(z) = 1/(1+e^-z)``;
  * LR+GD: ``theta_{t+1} = theta_t - gamma grad f(theta_t)``, ``theta_0 = 0``;
  * Normalized LR+GD: ``theta_{t+1} = theta_t - gamma beta_t grad f(theta_t)`` with
    ``beta_t = [(1/n) sum_i (1 + exp(m_i))^-1]^-1 = 1 / mean_i sigma(-m_i)``.

Also available (``rule='risk_adaptive'``): the risk-adaptive step ``theta - gamma grad f / f`` of
Zhang, Wu, Lin & Bartlett (arXiv 2504.04105), the adaptive companion of the constant large step of
Wu, Bartlett, Telgarsky & Yu (COLT 2024), whose "schedule" is a constant ``gamma`` chosen large
(``gamma = Theta(T)`` for a budget of ``T`` steps): that is ``rule='constant'`` with a large gamma.

Numerics (no deviation from the paper's maths, only how it is evaluated): the loss uses
``softplus(-m)``; the normalized direction ``beta_t grad f = -sum_i w_i y_i a_i`` with weights
``w = softmax(-softplus(m))`` (= ``sigma(-m_i) / sum_j sigma(-m_j)``), so it stays finite when all
``sigma(-m_i)`` underflow; the risk-adaptive direction is evaluated in log space likewise. The
dtype follows the inputs: pass float64 arrays under ``jax.enable_x64(True)`` for the limit studies.

Closed forms: :func:`two_point_first_loss` (Thm 4.1: on the two-point example one step from 0
gives ``theta_1 = gamma (1/2, 3/4)``, margins ``-gamma/4`` and ``7 gamma / 2``, so ``f(theta_1)``
grows like ``gamma / 8`` while ``theta_2`` separates) and :func:`normalized_gd_bound` (Thm 6.1).

A run from ``theta_0 = 0`` is ``lax.scan`` over iterations; :func:`sweep` is ``jax.vmap`` of it
over a grid of step sizes, compiled once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

RULES = ("constant", "normalized", "risk_adaptive")


class Trace(NamedTuple):
    """Per-iteration record of a run, for ``t = 0..T`` (``theta_0 = 0`` included).

    Shapes are for one run; :func:`sweep` adds a leading step-size axis ``G``.

    Attributes:
      params: ``(T+1, d)`` the iterates ``theta_t`` (``(T+1, 0)`` when not kept).
      loss: ``(T+1,)`` logistic loss ``f(theta_t)``.
      accuracy: ``(T+1,)`` fraction of samples with ``y_i a_i^T theta_t > 0``.
      grad_norm: ``(T+1,)`` ``||grad f(theta_t)||``.
      margin: ``(T+1,)`` normalized margin ``min_i y_i a_i^T theta_t / ||theta_t||`` (0 at 0).
      separated: ``(T+1,)`` bool, ``min_i y_i a_i^T theta_t > 0`` (the problem is solved).
    """

    params: jax.Array
    loss: jax.Array
    accuracy: jax.Array
    grad_norm: jax.Array
    margin: jax.Array
    separated: jax.Array


def margins(theta: jax.Array, features: jax.Array, labels: jax.Array) -> jax.Array:
    """``m_i = y_i a_i^T theta``: ``theta (d,)``, ``features (n, d)``, ``labels (n,)`` -> ``(n,)``.
    """
    return labels * (features @ theta)


def loss(theta: jax.Array, features: jax.Array, labels: jax.Array) -> jax.Array:
    """Logistic loss ``f(theta) = mean_i log(1 + exp(-m_i))`` (scalar)."""
    return jnp.mean(jax.nn.softplus(-margins(theta, features, labels)))


def gradient(theta: jax.Array, features: jax.Array, labels: jax.Array) -> jax.Array:
    """``grad f(theta) = -(1/n) sum_i sigma(-m_i) y_i a_i`` -> ``(d,)`` (closed form)."""
    weights = jax.nn.sigmoid(-margins(theta, features, labels)) * labels
    return -(weights @ features) / features.shape[0]


def normalization(theta: jax.Array, features: jax.Array, labels: jax.Array) -> jax.Array:
    """``beta_t = 1 / mean_i sigma(-m_i)`` of Normalized LR+GD (scalar; inf if all underflow)."""
    return 1.0 / jnp.mean(jax.nn.sigmoid(-margins(theta, features, labels)))


def direction(theta: jax.Array, features: jax.Array, labels: jax.Array,
              rule: str = "constant") -> jax.Array:
    """The vector ``D`` with ``theta_{t+1} = theta_t - gamma * D``, ``(d,)``.

    ``rule='constant'``: ``grad f``; ``'normalized'``: ``beta_t grad f``; ``'risk_adaptive'``:
    ``grad f / f``. The last two are evaluated stably in log space.
    """
    m = margins(theta, features, labels)
    if rule == "constant":
        return gradient(theta, features, labels)
    if rule == "normalized":
        weights = jax.nn.softmax(-jax.nn.softplus(m))  # sigma(-m_i) / sum_j sigma(-m_j)
        return -((weights * labels) @ features)
    if rule == "risk_adaptive":
        log_sig = -jax.nn.softplus(m)  # log sigma(-m)
        # log(log(1 + e^{-m})): for large m, log1p(e^{-m}) ~ e^{-m} so the log is ~ -m.
        log_loss = jnp.where(m > 30.0, -m - 0.5 * jnp.exp(-jnp.minimum(m, 700.0)),
                             jnp.log(jax.nn.softplus(-jnp.minimum(m, 30.0))))
        shift = jnp.max(log_loss)
        scale = jnp.exp(log_sig - shift) / jnp.sum(jnp.exp(log_loss - shift))
        return -((scale * labels) @ features)
    raise ValueError(f"rule={rule!r} is not valid. Valid choices: {', '.join(RULES)}.")


def _metrics(theta: jax.Array, features: jax.Array, labels: jax.Array):
    m = margins(theta, features, labels)
    norm = jnp.linalg.norm(theta)
    safe = jnp.where(norm > 0, norm, 1.0)
    return (jnp.mean(jax.nn.softplus(-m)), jnp.mean(m > 0),
            jnp.linalg.norm(gradient(theta, features, labels)),
            jnp.where(norm > 0, jnp.min(m) / safe, 0.0), jnp.min(m) > 0)


def check_gamma(gamma) -> None:
    """Raises ValueError unless every step size is a finite number > 0."""
    values = np.asarray(gamma, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("the step-size grid is empty; give at least one gamma > 0.")
    bad = values[~(np.isfinite(values) & (values > 0))]
    if bad.size:
        raise ValueError(f"step sizes must be finite and > 0 (gamma > 0), got {bad.tolist()[:5]}.")


def _check_data(features, labels) -> None:
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError("the dataset is empty or not an (n, d) matrix (features "
                         f"{features.shape}); need n >= 1 samples with d >= 1 features.")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must have shape ({features.shape[0]},), got {labels.shape}.")


def _run(features, labels, gamma, code, num_steps: int, rules: tuple[str, ...],
         keep_params: bool) -> Trace:
    """One run; ``code`` indexes ``rules`` (a traced int, so one compiled sweep mixes rules)."""
    branches = [functools.partial(direction, rule=r) for r in rules]

    def step(theta, _):
        out = _metrics(theta, features, labels)
        kept = theta if keep_params else theta[:0]
        if len(branches) == 1:
            d = branches[0](theta, features, labels)
        else:
            d = jax.lax.switch(code, branches, theta, features, labels)
        return theta - gamma * d, (kept, *out)

    theta0 = jnp.zeros(features.shape[1], features.dtype)
    _, outs = jax.lax.scan(step, theta0, None, length=num_steps + 1)
    return Trace(*outs)


def _rules(rule, size: int) -> tuple[tuple[str, ...], np.ndarray]:
    names = [rule] * size if isinstance(rule, str) else list(rule)
    if len(names) != size:
        raise ValueError(f"got {len(names)} rules for {size} step sizes; give one rule or one per "
                         "step size.")
    for name in names:
        if name not in RULES:
            raise ValueError(f"rule={name!r} is not valid. Valid choices: {', '.join(RULES)}.")
    used = tuple(r for r in RULES if r in names)
    return used, np.asarray([used.index(r) for r in names], np.int32)


def run(features: jax.Array, labels: jax.Array, gamma: float, num_steps: int, *,
        rule: str = "constant", keep_params: bool = True) -> Trace:
    """``num_steps`` iterations of LR+GD (or a variant, see ``rule``) from ``theta_0 = 0``.

    Args:
      features: ``(n, d)`` the ``a_i``.
      labels: ``(n,)`` in ``{-1, +1}``.
      gamma: step size ``> 0``.
      num_steps: ``T >= 0``.
      rule: one of :data:`RULES` (``'constant'`` = LR+GD, ``'normalized'`` = Normalized LR+GD).
      keep_params: record ``theta_t`` (``(T+1, d)``) in the trace.
    Returns:
      :class:`Trace` over ``t = 0..T``.
    """
    check_gamma(gamma)
    trace = sweep(features, labels, np.reshape(np.asarray(gamma, np.float64), (1,)), num_steps,
                  rule=rule, keep_params=keep_params)
    return jax.tree_util.tree_map(lambda v: v[0], trace)


@functools.partial(jax.jit, static_argnames=("num_steps", "rules", "keep_params"))
def _sweep(features, labels, gammas, codes, num_steps: int, rules: tuple[str, ...],
           keep_params: bool) -> Trace:
    return jax.vmap(lambda g, c: _run(features, labels, g, c, num_steps, rules, keep_params))(
        gammas, codes)


def sweep(features: jax.Array, labels: jax.Array, gammas: jax.Array, num_steps: int, *,
          rule: str | Sequence[str] = "constant", keep_params: bool = True) -> Trace:
    """:func:`run` for every step size of ``gammas (G,)``, as one compiled ``jax.vmap``.

    ``rule`` is one of :data:`RULES` or a sequence of ``G`` of them (one per step size), so
    LR+GD and Normalized LR+GD share one compiled sweep (all rules used are then evaluated at
    every step and the right one selected).

    Returns:
      :class:`Trace` with a leading axis ``G`` (``params (G, T+1, d)``, metrics ``(G, T+1)``).
    """
    features = jnp.asarray(features)
    labels = jnp.asarray(labels, dtype=features.dtype)
    _check_data(features, labels)
    check_gamma(gammas)
    gammas = np.asarray(gammas, np.float64).reshape(-1)
    rules, codes = _rules(rule, gammas.size)
    if int(num_steps) < 0:
        raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
    return _sweep(features, labels, jnp.asarray(gammas, features.dtype), jnp.asarray(codes),
                  int(num_steps), rules, keep_params)


def iterations_to_separate(separated) -> np.ndarray:
    """First ``t`` with ``separated[..., t]`` true, or -1 if never: ``(..., T+1)`` -> ``(...)``."""
    separated = np.asarray(separated, dtype=bool)
    first = np.argmax(separated, axis=-1)
    return np.where(separated.any(axis=-1), first, -1)


def scaled_distance(params: jax.Array, gammas: jax.Array, reference: jax.Array) -> np.ndarray:
    """``max_t ||theta_t / gamma - ref_t||`` for each step size (Thm 3.2's limit).

    Args:
      params: ``(G, T+1, d)`` iterates of :func:`sweep`.
      gammas: ``(G,)``.
      reference: ``(T+1, d)`` e.g. the Batch Perceptron iterates.
    Returns:
      ``(G,)`` NumPy array.
    """
    params = np.asarray(params, dtype=np.float64)
    gammas = np.asarray(gammas, dtype=np.float64).reshape(-1, 1, 1)
    diff = params / gammas - np.asarray(reference, dtype=np.float64)[None]
    return np.max(np.linalg.norm(diff, axis=-1), axis=-1)


def two_point_first_loss(gamma: float | np.ndarray) -> np.ndarray:
    """Thm 4.1: ``f(theta_1) = (log(1 + e^{gamma/4}) + log(1 + e^{-7 gamma/2})) / 2`` after one
    LR+GD step from 0 on :func:`lrx.data.separable.two_point`; ``gamma`` scalar or ``(G,)``
    (float64, evaluated with ``logaddexp`` so large gammas do not overflow)."""
    gamma = np.asarray(gamma, np.float64)
    return 0.5 * (np.logaddexp(0.0, gamma / 4) + np.logaddexp(0.0, -3.5 * gamma))


def normalized_gd_bound(n: int, radius: float, margin: float, gamma: float) -> float:
    """Thm 6.1: Normalized LR+GD from 0 with step ``gamma`` separates ``n`` samples of radius
    ``R`` and margin ``mu`` within ``R^2 / mu^2 + 2 log(2n - 1) / (gamma mu^2)`` iterations."""
    if not (radius > 0 and 0 < margin <= radius) or n < 1:
        raise ValueError(f"need n >= 1, R > 0 and 0 < mu <= R, got n={n}, R={radius}, "
                         f"mu={margin}.")
    check_gamma(gamma)
    return radius**2 / margin**2 + 2 * math.log(2 * n - 1) / (gamma * margin**2)
