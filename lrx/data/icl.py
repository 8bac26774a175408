"""Prompts for in-context linear regression.

Reference: E. Akyürek, D. Schuurmans, J. Andreas, T. Ma, D. Zhou, "What learning algorithm is
in-context learning? Investigations with linear models", ICLR 2023, arXiv 2211.15661 (Sec. 2.3
and 4.2); J. von Oswald et al., "Transformers learn in-context by gradient descent",
arXiv 2212.07677 (Sec. 2, token layout ``e_i = (x_i, y_i)``).

Data model (Akyürek et al., Sec. 4.2): ``x_i ~ N(0, I_d)``, ``w ~ N(0, tau^2 I_d)``,
``y_i = w^T x_i + eps_i`` with ``eps_i ~ N(0, sigma^2)``; ``sigma = 0`` is the noiseless case.

Token layouts:
  * :func:`interleave` (Akyürek et al.): tokens of size ``d + 1``, ``x~_i = [0, x_i]`` and
    ``y~_i = [y_i, 0_d]``, in the order ``x~_1, y~_1, x~_2, ..., x~_n``. The final ``y~_n`` is
    dropped (it is never an input, as in the official code that feeds ``seq[:, :-1]``), so a
    prompt of ``n`` pairs is ``2n - 1`` tokens long. The model's output at the x-token ``2i``
    (0-based) predicts ``y_i`` from the ``i`` earlier pairs.
  * :func:`stack_tokens` (von Oswald et al.): ``e_i = [x_i, y_i]`` for the ``N`` context pairs and a
    query token ``[x_q, 0]``.

Every sampler is a pure function of a PRNG key (fresh, reproducible prompts per training step).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Prompts(NamedTuple):
    """A batch of regression prompts.

    Attributes:
      x: ``(B, n, d)`` inputs.
      y: ``(B, n)`` targets ``w^T x + eps``.
      w: ``(B, d)`` the task vector of each prompt.
    """

    x: jax.Array
    y: jax.Array
    w: jax.Array


def _check(batch_size: int, num_pairs: int, dim: int, noise_std: float, weight_std: float):
    for name, value in (("batch_size", batch_size), ("num_pairs", num_pairs), ("dim", dim)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if noise_std < 0:
        raise ValueError(f"noise_std (sigma) must be >= 0, got {noise_std}")
    if weight_std <= 0:
        raise ValueError(f"weight_std (tau) must be > 0, got {weight_std}")


def sample(key: jax.Array, batch_size: int, num_pairs: int, dim: int, *,
           noise_std: float = 0.0, weight_std: float = 1.0,
           dtype: jnp.dtype = jnp.float32) -> Prompts:
    """Samples ``batch_size`` prompts of ``num_pairs`` pairs ``(x_i, y_i)`` in ``dim`` dimensions.

    Args:
      key: PRNG key (the prompts are a pure function of it).
      batch_size: B.
      num_pairs: n, pairs per prompt.
      dim: d.
      noise_std: sigma (label noise std); 0 = noiseless.
      weight_std: tau (std of each coordinate of w).
    Returns:
      :class:`Prompts` with ``x (B, n, d)``, ``y (B, n)``, ``w (B, d)``.
    """
    _check(batch_size, num_pairs, dim, noise_std, weight_std)
    kx, kw, ke = jax.random.split(key, 3)
    x = jax.random.normal(kx, (batch_size, num_pairs, dim), dtype)
    w = weight_std * jax.random.normal(kw, (batch_size, dim), dtype)
    y = jnp.einsum("bnd,bd->bn", x, w)
    if noise_std > 0:
        y = y + noise_std * jax.random.normal(ke, y.shape, dtype)
    return Prompts(x, y, w)


def interleave(x: jax.Array, y: jax.Array) -> jax.Array:
    """Akyürek et al.'s layout: ``[0, x_1], [y_1, 0_d], ..., [0, x_n]`` (the last y-token dropped).

    Args:
      x: ``(..., n, d)``.
      y: ``(..., n)``.
    Returns:
      ``(..., 2n - 1, d + 1)`` tokens; x-tokens at even positions, y-tokens at odd positions.
    """
    if x.shape[:-1] != y.shape:
        raise ValueError(f"x {x.shape} and y {y.shape} disagree: need x (..., n, d), y (..., n)")
    zeros_1 = jnp.zeros(y.shape + (1,), x.dtype)
    zeros_d = jnp.zeros(x.shape, x.dtype)
    x_tok = jnp.concatenate([zeros_1, x], axis=-1)
    y_tok = jnp.concatenate([y[..., None].astype(x.dtype), zeros_d], axis=-1)
    tokens = jnp.stack([x_tok, y_tok], axis=-2)  # (..., n, 2, d+1)
    tokens = tokens.reshape(x.shape[:-2] + (2 * x.shape[-2], x.shape[-1] + 1))
    return tokens[..., :-1, :]


def x_positions(num_pairs: int) -> jax.Array:
    """Positions of the x-tokens in :func:`interleave`'s layout: ``(n,)`` = ``0, 2, ..., 2n-2``."""
    return 2 * jnp.arange(num_pairs)


def stack_tokens(x: jax.Array, y: jax.Array, x_query: jax.Array) -> jax.Array:
    """von Oswald et al.'s layout: ``e_i = [x_i, y_i]`` (``i = 1..N``) then ``[x_q, 0]``.

    Args:
      x: ``(..., N, d)`` context inputs.
      y: ``(..., N)`` context targets.
      x_query: ``(..., d)`` query input.
    Returns:
      ``(..., N + 1, d + 1)``.
    """
    ctx = jnp.concatenate([x, y[..., None].astype(x.dtype)], axis=-1)
    query = jnp.concatenate([x_query, jnp.zeros(x_query.shape[:-1] + (1,), x.dtype)], axis=-1)
    return jnp.concatenate([ctx, query[..., None, :]], axis=-2)


LAYOUTS = ("interleave", "stack")


def place_probes(tokens: jax.Array, probes: jax.Array, position: int | jax.Array,
                 layout: str) -> jax.Array:
    """Copies of a prompt with its query token replaced by each probe input.

    The query token at ``position`` becomes the probe's x-token in ``layout``: ``[0, x']``
    (``"interleave"``, :func:`interleave`'s x-tokens) or ``[x', 0]`` (``"stack"``,
    :func:`stack_tokens`' query). Both models are causal or read only the query, so tokens after
    ``position`` do not matter.

    Args:
      tokens: ``(B, T, d + 1)`` prompts.
      probes: ``(B, m, d)`` probe inputs ``x'_j``, ``m`` per prompt.
      position: index of the query token (``2k`` for prefix ``k`` in the interleaved layout,
        ``N`` in the stacked one).
      layout: one of :data:`LAYOUTS`.
    Returns:
      ``(B, m, T, d + 1)``: prompt ``b`` with its token ``position`` set to probe ``(b, j)``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown token layout {layout!r}; choose one of {LAYOUTS}")
    b, t, width = tokens.shape
    if probes.ndim != 3 or probes.shape[0] != b or probes.shape[2] != width - 1:
        raise ValueError(f"probes {probes.shape} do not fit tokens {tokens.shape}: need "
                         f"(B={b}, m, d={width - 1})")
    if isinstance(position, int) and not 0 <= position < t:  # may be traced (lax.map over k)
        raise ValueError(f"position {position} outside the {t} tokens")
    zero = jnp.zeros(probes.shape[:-1] + (1,), tokens.dtype)
    parts = (zero, probes.astype(tokens.dtype)) if layout == "interleave" else (
        probes.astype(tokens.dtype), zero)
    query = jnp.concatenate(parts, axis=-1)                     # (B, m, d + 1)
    seq = jnp.broadcast_to(tokens[:, None], (b, probes.shape[1], t, width))
    return seq.at[:, :, position].set(query)
