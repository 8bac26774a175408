"""Core of lrx.param: ``dot(x, w)`` for dense or factored weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dot(x: jax.Array, w) -> jax.Array:
    """``x @ W`` over the last axis of ``x``.

    Args:
      x: ``(..., m)`` activations.
      w: a dense ``(m, n)`` array (Flax ``(in, out)`` layout) or a factored weight node that
        implements ``.dot(x)``.
    Returns:
      ``(..., n)``, in the dtype of ``x``.
    """
    if hasattr(w, "dot") and not isinstance(w, jax.Array | jnp.ndarray):
        return w.dot(x)
    return jnp.matmul(x, jnp.asarray(w, x.dtype))
