"""A small GPT-style decoder for in-context regression, and a linear self-attention layer.

References:
  * E. Akyürek et al., "What learning algorithm is in-context learning? Investigations with linear
    models", ICLR 2023, arXiv 2211.15661, Sec. 4.2 / App. D: a decoder-only transformer with a
    linear read-in to the hidden size, learned absolute position embeddings, pre-LayerNorm blocks,
    causal multi-head softmax attention, a GELU (tanh approximation) MLP of width 4H and a linear
    read-out to one number at every position.
  * J. von Oswald et al., "Transformers learn in-context by gradient descent", arXiv 2212.07677,
    Sec. 2 / Prop. 1: a linear self-attention (LSA) layer
    ``e_j <- e_j + P sum_i (W_V e_i)(W_K e_i)^T (W_Q e_j)`` whose weights can be set by hand so
    that it performs one step of gradient descent on the in-context least-squares loss.

Every matrix product ``x @ W`` goes through :func:`lrx.param.dot`, so a factored weight (low-rank,
LoRA, ...) can replace any kernel without touching this file. Kernels use Flax's ``(in, out)``
layout.

Deviations: kernels start from Flax's LeCun-normal initialiser and biases from zero (the official
code uses U(-sqrt(1/fan_in), sqrt(1/fan_in)) for both; this does not change the architecture).
The LSA layer sums over the ``N`` context tokens only and reads the prediction from the last
coordinate of the updated query token (von Oswald et al. read ``-y`` with the opposite sign
convention of ``W_V``); its normaliser is ``1/N``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrx.param import dot, read_kernel


def _weight(module: nn.Module, name: str, init: Any, shape: tuple[int, ...]) -> Any:
    """The kernel ``name``: dense (``module.param``) or a stored factored lrx.param node, whose
    dense shape is checked (:func:`lrx.param.read_kernel`)."""
    return read_kernel(module, name, init, shape, jnp.float32)


def _identity_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class Dense(nn.Module):
    """``y = x @ W (+ b)``; ``W`` ``(in, out)`` may be dense or a factored lrx.param node."""

    features: int
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = _weight(self, "kernel", self.kernel_init, (x.shape[-1], self.features))
        y = dot(x, kernel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


class CausalSelfAttention(nn.Module):
    """Multi-head causal softmax attention: ``(B, T, H) -> (B, T, H)``."""

    hidden_size: int
    num_heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        head_dim = self.hidden_size // self.num_heads
        split = lambda z: z.reshape(b, t, self.num_heads, head_dim)
        q = split(Dense(self.hidden_size, name="query")(x))
        k = split(Dense(self.hidden_size, name="key")(x))
        v = split(Dense(self.hidden_size, name="value")(x))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return Dense(self.hidden_size, name="out")(out.reshape(b, t, self.hidden_size))


class MLP(nn.Module):
    """``Dense(mlp_ratio * H) -> GELU(tanh) -> Dense(H)``."""

    hidden_size: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.gelu(Dense(self.mlp_ratio * self.hidden_size, name="fc")(x), approximate=True)
        return Dense(self.hidden_size, name="proj")(h)


class Block(nn.Module):
    """Pre-LN transformer block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``."""

    hidden_size: int
    num_heads: int
    mlp_ratio: int = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CausalSelfAttention(self.hidden_size, self.num_heads, name="attn")(
            nn.LayerNorm(name="ln_attn")(x))
        return x + MLP(self.hidden_size, self.mlp_ratio, name="mlp")(nn.LayerNorm(name="ln_mlp")(x))


class GPT(nn.Module):
    """Decoder for in-context regression: tokens ``(B, T, d + 1)`` -> predictions ``(B, T)``.

    Attributes:
      num_layers: L; hidden_size: H (divisible by num_heads); num_heads: M;
      max_len: the number of learned position embeddings (``>= T``); mlp_ratio: MLP width / H.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    max_len: int
    mlp_ratio: int = 4

    def setup_check(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        self.setup_check()
        t = tokens.shape[-2]
        if t > self.max_len:
            raise ValueError(f"sequence of {t} tokens exceeds max_len={self.max_len}")
        h = Dense(self.hidden_size, name="read_in")(tokens)
        pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                         (self.max_len, self.hidden_size), jnp.float32)
        h = h + pos[:t]
        for i in range(self.num_layers):
            h = Block(self.hidden_size, self.num_heads, self.mlp_ratio, name=f"block_{i}")(h)
        h = nn.LayerNorm(name="ln_final")(h)
        return Dense(1, name="read_out")(h)[..., 0]


class LinearSelfAttention(nn.Module):
    """One LSA layer (von Oswald et al., Eq. 3, one head, ``P`` folded into ``projection``).

    Input ``tokens (B, N + 1, d + 1)``: ``N`` context tokens ``[x_i, y_i]`` then the query
    ``[x_q, 0]``. The query is updated as
    ``e_q + (1/N) sum_{i<=N} (e_i W_V) (e_i W_K . e_q W_Q) W_P`` and the prediction is its last
    coordinate. Returns ``(B,)``.
    """

    use_projection: bool = True

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        width = tokens.shape[-1]
        init = nn.initializers.normal(0.02)
        wq = _weight(self, "query", init, (width, width))
        wk = _weight(self, "key", init, (width, width))
        wv = _weight(self, "value", init, (width, width))
        ctx, query = tokens[..., :-1, :], tokens[..., -1, :]
        q = dot(query, wq)                                    # (B, w)
        k = dot(ctx, wk)                                      # (B, N, w)
        v = dot(ctx, wv)                                      # (B, N, w)
        scores = jnp.einsum("bnw,bw->bn", k, q) / ctx.shape[-2]
        update = jnp.einsum("bn,bnw->bw", scores, v)
        if self.use_projection:
            update = dot(update, _weight(self, "projection", _identity_init,
                                         (width, width)))
        return (query + update)[..., -1]


def gd_lsa_params(dim: int, step: float) -> dict:
    """Hand-set :class:`LinearSelfAttention` weights that perform one GD step (von Oswald et al.,
    Prop. 1, with ``W_0 = 0``).

    With ``W_Q = W_K = [[I_d, 0], [0, 0]]``, ``W_V`` mapping ``y`` to the last coordinate with
    gain ``step`` and ``W_P = I``, the query's last coordinate becomes
    ``(step / N) sum_i y_i x_i^T x_q``: the prediction at ``x_q`` of ``w_1 = w_0 - step * grad L``
    from ``w_0 = 0`` for ``L(w) = (1/(2N)) sum_i (w^T x_i - y_i)^2``.

    Args:
      dim: d; step: the GD learning rate eta (may be a traced scalar).
    Returns:
      ``{'params': {...}}`` for ``LinearSelfAttention().apply``.
    """
    width = dim + 1
    qk = jnp.zeros((width, width), jnp.float32).at[:dim, :dim].set(jnp.eye(dim))
    wv = jnp.zeros((width, width), jnp.float32).at[dim, dim].set(step)
    return {"params": {"query": qk, "key": qk, "value": wv,
                       "projection": jnp.eye(width, dtype=jnp.float32)}}
