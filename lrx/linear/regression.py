"""Reference learners for in-context linear regression, evaluated at every prefix of a prompt.

Reference: E. Akyürek, D. Schuurmans, J. Andreas, T. Ma, D. Zhou, "What learning algorithm is
in-context learning? Investigations with linear models", ICLR 2023, arXiv 2211.15661, Sec. 4.3
("reference predictors"); S. Garg et al., arXiv 2208.01066 (averaging); J. von Oswald et al.,
arXiv 2212.07677 (one GD step).

A prompt is ``x (n, d)``, ``y (n,)``. "The learner at prefix ``k``" is fitted on the first ``k``
pairs ``(x_i, y_i)_{i<k}`` and predicts at ``x_k`` (``k = 0..n-1``; at ``k = 0`` every learner
predicts 0). Each linear learner is a function ``fn(x, y, k, ...) -> w (d,)`` of one prefix
(rows ``i >= k`` are masked to zero, so one compiled function serves every ``k``);
:func:`prefix_weights` evaluates it at all prefixes (``(n, d)``) and :func:`predict` turns weights
into predictions. Vectorise over prompts with ``jax.vmap``.

Learners (``X``, ``Y`` = the first ``k`` rows):
  * :func:`ridge`: ``w = (X^T X + lambda I)^-1 X^T Y``, evaluated through the SVD
    ``X = U S V^T`` as ``w = V diag(s / (s^2 + lambda)) U^T Y`` with singular values below
    ``max(n, d) * eps * s_max`` dropped, so ``lambda = 0`` is the minimum-norm least-squares
    solution ``pinv(X) Y`` (the paper's OLS for ``k < d``). Bayes-optimal ``lambda = sigma^2/tau^2``
    (:func:`bayes_lambda`).
  * :func:`least_squares`: ``ridge`` with ``lambda = 0``.
  * :func:`gradient_descent`: ``num_steps`` steps of full-batch GD on
    ``L(w) = sum_i (w^T x_i - y_i)^2`` from ``w_0 = 0``:
    ``w_{t+1} = w_t - 2 * step * (X^T X w_t - X^T Y)`` (the paper's convention, a sum over
    examples, no ``1/k``); one step is ``w = 2 * step * X^T Y``.
  * :func:`sgd`: one pass of batch-size-1 SGD over ``i = 0..k-1`` with the same update
    ``w <- w - 2 * step * x_i (x_i^T w - y_i)`` from ``w = 0``. (The official code clips the
    gradient to [-20, 20]; we do not clip.)
  * :func:`averaging`: ``w = (1/k) sum_i y_i x_i`` (Garg et al.'s "averaging"; Akyürek et al.'s
    code calls it "Lstsq-Constant-Sigma").
  * :func:`knn`: the mean of the ``y`` of the ``min(3, k)`` nearest earlier ``x_i`` (Euclidean),
    ``weighting='uniform'``, or weighted by inverse distance ``1/||x - x_i||``
    (``weighting='distance'``, scikit-learn's rule used by the official code; an exact match takes
    all the weight). Not linear in the query: use :func:`prefix_knn`.

Step sizes are tuned with :func:`tune_step`, by grid search on sampled prompts, per prefix ``k``
(the default, the strongest GD/SGD baselines) or one step for all prefixes. The paper plots fixed
steps (GD 0.01/0.02, SGD 0.01/0.03); a tuned step is a stronger comparator.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

WEIGHTINGS = ("uniform", "distance")


def _masked(x: jax.Array, y: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
    keep = (jnp.arange(x.shape[0]) < k).astype(x.dtype)
    return x * keep[:, None], y * keep


def bayes_lambda(noise_std: float, weight_std: float) -> float:
    """The Bayes-optimal (minimum-risk) ridge penalty ``sigma^2 / tau^2`` for the prior
    ``w ~ N(0, tau^2 I)`` and noise ``N(0, sigma^2)``."""
    if weight_std <= 0:
        raise ValueError(f"weight_std (tau) must be > 0, got {weight_std}")
    return float(noise_std) ** 2 / float(weight_std) ** 2


def ridge(x: jax.Array, y: jax.Array, k: jax.Array | int, lam: jax.Array | float) -> jax.Array:
    """Ridge regression on the first ``k`` pairs (``lam = 0``: minimum-norm least squares).

    Args:
      x: ``(n, d)``; y: ``(n,)``; k: number of pairs used (0..n); lam: ``lambda >= 0``.
    Returns:
      ``(d,)`` weights.
    """
    xk, yk = _masked(x, y, k)
    u, s, vt = jnp.linalg.svd(xk, full_matrices=False)
    tol = max(x.shape) * jnp.finfo(x.dtype).eps * jnp.max(s)
    keep = s > tol
    s_safe = jnp.where(keep, s, 1.0)
    factor = jnp.where(keep, s_safe / (s_safe**2 + lam), 0.0)
    return vt.T @ (factor * (u.T @ yk))


def least_squares(x: jax.Array, y: jax.Array, k: jax.Array | int) -> jax.Array:
    """Minimum-norm least squares ``pinv(X_k) Y_k`` on the first ``k`` pairs: ``(d,)``."""
    return ridge(x, y, k, 0.0)


def gradient_descent(x: jax.Array, y: jax.Array, k: jax.Array | int, step: jax.Array | float,
                     num_steps: int = 1) -> jax.Array:
    """``num_steps`` steps of GD on ``sum_{i<k} (w^T x_i - y_i)^2`` from 0 with step ``step``.

    Args:
      x: ``(n, d)``; y: ``(n,)``; k: pairs used; step: alpha; num_steps: static int >= 1.
    Returns:
      ``(d,)`` weights.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    xk, yk = _masked(x, y, k)
    gram, moment = xk.T @ xk, xk.T @ yk

    def body(_, w):
        return w - 2.0 * step * (gram @ w - moment)

    return jax.lax.fori_loop(0, num_steps, body, jnp.zeros(x.shape[1], x.dtype))


def sgd(x: jax.Array, y: jax.Array, k: jax.Array | int, step: jax.Array | float) -> jax.Array:
    """One pass of batch-size-1 SGD over the first ``k`` pairs, in order, from 0: ``(d,)``."""

    def body(w, inputs):
        i, xi, yi = inputs
        w_new = w - 2.0 * step * xi * (xi @ w - yi)
        return jnp.where(i < k, w_new, w), None

    w, _ = jax.lax.scan(body, jnp.zeros(x.shape[1], x.dtype), (jnp.arange(x.shape[0]), x, y))
    return w


def averaging(x: jax.Array, y: jax.Array, k: jax.Array | int) -> jax.Array:
    """``(1/k) sum_{i<k} y_i x_i`` (0 at ``k = 0``): ``(d,)``."""
    xk, yk = _masked(x, y, k)
    return (xk.T @ yk) / jnp.maximum(k, 1).astype(x.dtype)


def prefix_weights(fn: Callable[..., jax.Array], x: jax.Array, y: jax.Array,
                   *args: jax.Array | float, **static) -> jax.Array:
    """Weights of a linear learner at every prefix ``k = 0..n-1``.

    Args:
      fn: ``fn(x, y, k, *args, **static) -> (d,)``, e.g. :func:`ridge`.
      x: ``(n, d)``; y: ``(n,)``.
      *args: scalars, or ``(n,)`` arrays giving a value per prefix (e.g. a tuned step per k).
      **static: static keyword arguments (e.g. ``num_steps``).
    Returns:
      ``(n, d)``; row ``k`` is fitted on pairs ``0..k-1``.
    """
    n = x.shape[0]
    per_k = [jnp.broadcast_to(jnp.asarray(a, x.dtype), (n,)) for a in args]
    return jax.vmap(lambda k, *a: fn(x, y, k, *a, **static))(jnp.arange(n), *per_k)


def predict(weights: jax.Array, queries: jax.Array) -> jax.Array:
    """``w_k^T q`` for weights ``(..., d)`` and queries ``(..., d)`` or ``(..., m, d)``.

    Returns:
      ``(...)`` or ``(..., m)``.
    """
    if queries.ndim == weights.ndim:
        return jnp.sum(weights * queries, axis=-1)
    return jnp.einsum("...d,...md->...m", weights, queries)


def knn(x: jax.Array, y: jax.Array, k: jax.Array | int, queries: jax.Array,
        num_neighbors: int = 3, weighting: str = "uniform") -> jax.Array:
    """k-nearest-neighbour regression on the first ``k`` pairs.

    Args:
      x: ``(n, d)``; y: ``(n,)``; k: pairs used; queries: ``(m, d)``.
      num_neighbors: neighbours (``min(num_neighbors, k)`` are used); weighting: 'uniform' or
        'distance' (inverse Euclidean distance; an exact match takes all the weight).
    Returns:
      ``(m,)`` predictions (0 when ``k = 0``).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; valid: {WEIGHTINGS}")
    if num_neighbors < 1:
        raise ValueError(f"num_neighbors must be >= 1, got {num_neighbors}")
    x, y, queries = jnp.asarray(x), jnp.asarray(y), jnp.asarray(queries)
    n = x.shape[0]
    valid = jnp.arange(n) < k
    sq = jnp.sum((queries[:, None, :] - x[None, :, :]) ** 2, axis=-1)  # (m, n)
    sq = jnp.where(valid[None, :], sq, jnp.inf)
    num = min(num_neighbors, n)
    neg, idx = jax.lax.top_k(-sq, num)  # the num smallest distances
    dist2 = -neg
    chosen = jnp.isfinite(dist2)
    if weighting == "uniform":
        wts = chosen.astype(x.dtype)
    else:
        dist = jnp.sqrt(jnp.where(chosen, dist2, 1.0))
        exact = chosen & (dist <= jnp.finfo(x.dtype).tiny)
        any_exact = jnp.any(exact, axis=-1, keepdims=True)
        inv = jnp.where(chosen, 1.0 / jnp.maximum(dist, jnp.finfo(x.dtype).tiny), 0.0)
        wts = jnp.where(any_exact, exact.astype(x.dtype), inv)
    total = jnp.sum(wts, axis=-1)
    out = jnp.sum(wts * y[idx], axis=-1) / jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, out, 0.0)


def prefix_knn(x: jax.Array, y: jax.Array, queries: jax.Array, num_neighbors: int = 3,
               weighting: str = "uniform") -> jax.Array:
    """:func:`knn` at every prefix: queries ``(n, m, d)`` (row ``k`` queried with ``k`` pairs)
    -> ``(n, m)``."""
    n = x.shape[0]
    return jax.vmap(lambda k, q: knn(x, y, k, q, num_neighbors, weighting))(jnp.arange(n), queries)


def tune_step(fn: Callable[..., jax.Array], xs: jax.Array, ys: jax.Array, grid: jax.Array,
              per_prefix: bool = True, **static) -> jax.Array:
    """Grid search of the step size of a linear learner on sampled prompts.

    The error of a step ``alpha`` at prefix ``k`` is the mean over prompts of
    ``(w_k(alpha)^T x_k - y_k)^2``.

    Args:
      fn: ``fn(x, y, k, step, **static) -> (d,)`` (:func:`gradient_descent`, :func:`sgd`).
      xs: ``(B, n, d)``; ys: ``(B, n)`` tuning prompts (use prompts other than the test ones).
      grid: ``(G,)`` candidate steps.
      per_prefix: a best step per prefix ``k``; else one step minimising the error summed over
        ``k = 1..n-1``.
    Returns:
      ``(n,)`` steps (all equal when ``per_prefix=False``; row 0 is irrelevant).
    """
    grid = jnp.asarray(grid, xs.dtype)

    def errors(step):
        w = jax.vmap(lambda x, y: prefix_weights(fn, x, y, step, **static))(xs, ys)
        return jnp.mean((predict(w, xs) - ys) ** 2, axis=0)  # (n,)

    err = jax.lax.map(errors, grid)  # (G, n)
    err = jnp.where(jnp.isfinite(err), err, jnp.inf)
    if per_prefix:
        return grid[jnp.argmin(err, axis=0)]
    best = grid[jnp.argmin(jnp.sum(err[:, 1:], axis=1))]
    return jnp.full((xs.shape[1],), best)
