"""A LLaMA-style decoder in flax (linen): RMSNorm, rotary position embeddings, SwiGLU MLP, causal
multi-head attention, no biases.

Architecture as in "LLaMA: Open and Efficient Foundation Language Models" (Touvron et al., arXiv
2302.13971) and the Hugging Face ``LlamaForCausalLM`` used by GaLore ("GaLore: Memory-Efficient
LLM Training by Gradient Low-Rank Projection", Zhao et al., arXiv 2403.03507): pre-norm blocks
``h = x + Attn(RMSNorm(x)); y = h + MLP(RMSNorm(h))`` with
``MLP(x) = W_down (silu(W_gate x) * W_up x)``, rotary embeddings in the "rotate half" convention,
untied input embedding and LM head, every weight initialised from N(0, 0.02²)
(``initializer_range``). The size presets ``llama_60m`` ... ``llama_7b`` match the GaLore
repository's ``configs/llama_*.json``.

Every ``x @ W`` goes through :func:`lrx.param.dot`, so a factored weight (``LowRank``, ``LoRA``,
...) placed in the parameter tree runs without materialising W and without changing this file.
Kernels are stored in Flax's ``(in, out)`` layout, the transpose of PyTorch's ``nn.Linear.weight``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lrx.optim.engine import from_int_view, int_view
from lrx.param import dot, read_kernel


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyperparameters of :class:`Llama` (names follow the Hugging Face LLaMA config)."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    vocab_size: int = 32000
    max_len: int = 1024
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_std: float = 0.02
    dtype: str = "float32"          # compute dtype of activations and matmuls
    param_dtype: str = "float32"
    scan_layers: bool = False       # stack the blocks' parameters on a leading layer axis
    remat: bool = False             # rematerialise each block in the backward pass

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "num_heads", "num_layers", "vocab_size",
                     "max_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("rotary embeddings need an even head dimension, got "
                             f"{self.hidden_size // self.num_heads}")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"LlamaConfig.{name}={getattr(self, name)!r}: valid choices are "
                                 "'float32', 'bfloat16', 'float16'")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


PRESETS: dict[str, LlamaConfig] = {
    # CPU default: ~1.3M parameters with the byte-level vocabulary; trains in minutes on 2 cores.
    "tiny": LlamaConfig(hidden_size=128, intermediate_size=352, num_heads=4, num_layers=6,
                        vocab_size=256, max_len=256),
    # GaLore repository configs/llama_*.json (vocab 32000, T5 tokenizer, sequence length 1024 max).
    "llama_60m": LlamaConfig(hidden_size=512, intermediate_size=1376, num_heads=8, num_layers=8),
    "llama_130m": LlamaConfig(hidden_size=768, intermediate_size=2048, num_heads=12, num_layers=12),
    "llama_350m": LlamaConfig(hidden_size=1024, intermediate_size=2736, num_heads=16,
                              num_layers=24),
    "llama_1b": LlamaConfig(hidden_size=2048, intermediate_size=5461, num_heads=32, num_layers=24),
    # GaLore repository configs/llama_7b.json (the paper's 7B memory claim: Fig. 1, Table 6).
    "llama_7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_heads=32,
                            num_layers=32),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
    """The named size preset, with fields replaced by ``overrides`` (e.g. ``vocab_size=256``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """``x / sqrt(mean(x², -1) + eps) * weight`` in float32; x ``(..., d)``, weight ``(d,)``."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


def rope_angles(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin of the rotary angles ``p · theta^(-2i/head_dim)``; positions ``(T,)`` ->
    two ``(T, head_dim)`` arrays (each frequency repeated for the two halves)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates ``x (B, T, heads, head_dim)`` pairwise ``(x_i, x_{i+d/2})`` by the angles
    (``(T, head_dim)`` cos/sin): ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return (x.astype(jnp.float32) * c + rotated.astype(jnp.float32) * s).astype(x.dtype)


def _take(stack: Any, i: jax.Array) -> Any:
    """Layer ``i`` of a stacked tree (every leaf ``(L, ...)``)."""
    return jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), stack)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def remat_stack(layer_fn: Callable[[Any, jax.Array], jax.Array], stack: Any,
                x: jax.Array) -> jax.Array:
    """``x_L`` of ``x_{i+1} = layer_fn(stack[i], x_i)``, ``i = 0 .. L-1``: a rematerialised scan
    over a stacked layer tree (every leaf ``(L, ...)``; ``x`` e.g. ``(B, T, H)``, same shape and
    dtype in and out), differentiable w.r.t. ``stack`` and ``x``.

    The forward loop keeps each layer's input (``(L, *x.shape)``, what a remat'ed ``nn.scan``
    keeps); the backward loop re-runs layer ``i`` under ``jax.vjp`` and writes its gradient into
    the stacked gradient in place. The numbers are those of ``nn.scan(nn.remat(Block))``; what
    differs is what XLA:CPU makes of it. XLA:CPU computes bf16 ops in float32, and under
    ``nn.scan`` it upcast every *whole* bf16 stack around the per-layer ``dynamic-slice`` and
    hoisted that float32 copy out of the loop, and kept the stacked bf16 gradients as float32
    loop buffers (llama_1b: ``f32[24,2048,5461]``-size buffers in both loops' tuples; README
    "Memory at paper scale"). Here both loops pass their carry (stack included) through
    ``optimization_barrier``, so no upcast can be hoisted (the slice is fused with its upcast),
    and the gradient stacks are written as uint16 views of their bits (:func:`_bits`), which
    nothing upcasts. Forward-mode differentiation (``jax.jvp``) is not defined (custom VJP).
    """
    return _stack_forward(layer_fn, stack, x, save=False)[0]


def _stack_forward(layer_fn, stack, x, save):
    num = jax.tree_util.tree_leaves(stack)[0].shape[0]
    saved = jnp.zeros((num if save else 0, *x.shape), int_view(x).dtype)

    def body(i, carry):
        h, saved, stack = jax.lax.optimization_barrier(carry)
        if save:
            saved = jax.lax.dynamic_update_index_in_dim(saved, int_view(h), i, 0)
        return layer_fn(_take(stack, i), h), saved, stack

    h, saved, _ = jax.lax.fori_loop(0, num, body, (x, saved, stack))
    return h, saved


def _remat_stack_fwd(layer_fn, stack, x):
    y, saved = _stack_forward(layer_fn, stack, x, save=True)
    return y, (stack, saved)


def _remat_stack_bwd(layer_fn, residuals, g_y):
    stack, saved = residuals
    num = saved.shape[0]

    def body(k, carry):
        g_h, grads, stack = jax.lax.optimization_barrier(carry)
        i = num - 1 - k
        x_i = from_int_view(jax.lax.dynamic_index_in_dim(saved, i, 0, keepdims=False), g_y.dtype)
        _, vjp = jax.vjp(layer_fn, _take(stack, i), x_i)
        g_layer, g_h = vjp(g_h)
        grads = jax.tree_util.tree_map(
            lambda a, v: jax.lax.dynamic_update_index_in_dim(a, int_view(v), i, 0), grads, g_layer)
        return g_h, grads, stack

    zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, int_view(a).dtype), stack)
    g_x, grads, _ = jax.lax.fori_loop(0, num, body, (g_y, zeros, stack))
    return jax.tree_util.tree_map(lambda g, a: from_int_view(g, a.dtype), grads, stack), g_x


remat_stack.defvjp(_remat_stack_fwd, _remat_stack_bwd)


class Linear(nn.Module):
    """``y = x @ W`` without bias; W ``(in, out)`` may be dense or a factored lrx.param node."""

    features: int
    init_std: float = 0.02
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = read_kernel(self, "kernel", nn.initializers.normal(self.init_std),
                             (x.shape[-1], self.features), self.param_dtype)
        return dot(x.astype(self.dtype), kernel)


class RMSNorm(nn.Module):
    eps: float = 1e-6
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, weight, self.eps)


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        c = self.config
        B, T, _ = x.shape
        lin = lambda name, f: Linear(f, c.init_std, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype),
                                     name=name)
        q = lin("q", c.hidden_size)(x).reshape(B, T, c.num_heads, c.head_dim)
        k = lin("k", c.hidden_size)(x).reshape(B, T, c.num_heads, c.head_dim)
        v = lin("v", c.hidden_size)(x).reshape(B, T, c.num_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return lin("o", c.hidden_size)(out.reshape(B, T, c.hidden_size))


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        lin = lambda name, f: Linear(f, c.init_std, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype),
                                     name=name)
        gate = lin("gate", c.intermediate_size)(x)
        up = lin("up", c.intermediate_size)(x)
        return lin("down", c.hidden_size)(nn.silu(gate) * up)


class Block(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array]):
        c = self.config
        pd = jnp.dtype(c.param_dtype)
        cos, sin = rope
        normed = RMSNorm(c.rms_norm_eps, pd, name="attn_norm")(x)
        h = x + Attention(c, name="attn")(normed, cos, sin)
        y = h + MLP(c, name="mlp")(RMSNorm(c.rms_norm_eps, pd, name="mlp_norm")(h))
        return y, None


class Llama(nn.Module):
    """Decoder-only LM: ``tokens (B, T) int -> logits (B, T, vocab_size) float32``.

    Parameter paths: ``embed/embedding``, ``layers_<i>/{attn/{q,k,v,o},mlp/{gate,up,down}}/kernel``,
    ``layers_<i>/{attn_norm,mlp_norm}/weight``, ``final_norm/weight``, ``lm_head/kernel``; with
    ``scan_layers`` the blocks are one ``layers/...`` subtree whose leaves carry a leading
    ``num_layers`` axis.

    >>> cfg = preset("tiny")
    >>> tokens = jnp.zeros((2, 16), jnp.int32)
    >>> params = Llama(cfg).init(jax.random.key(0), tokens)["params"]
    >>> Llama(cfg).apply({"params": params}, tokens).shape
    (2, 16, 256)
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        T = tokens.shape[-1]
        if T > c.max_len:
            raise ValueError(f"sequence length {T} exceeds the model's max_len={c.max_len}")
        embedding = self.param("embedding", nn.initializers.normal(c.init_std),
                               (c.vocab_size, c.hidden_size), jnp.dtype(c.param_dtype))
        x = jnp.take(embedding, tokens, axis=0).astype(jnp.dtype(c.dtype))
        rope = rope_angles(jnp.arange(T), c.head_dim, c.rope_theta)
        block = nn.remat(Block) if c.remat else Block
        if c.scan_layers and c.remat and not self.is_initializing():
            # the parameters the nn.scan below creates, run by remat_stack (same numbers; no
            # float32 copy of a whole stack on XLA:CPU)
            x = remat_stack(lambda layer, h: Block(c).apply(
                {"params": layer}, h, rope_angles(jnp.arange(h.shape[1]), c.head_dim,
                                                  c.rope_theta))[0],
                self.variables["params"]["layers"], x)
        elif c.scan_layers:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=c.num_layers)
            x, _ = stack(c, name="layers")(x, rope)
        else:
            for i in range(c.num_layers):
                x, _ = block(c, name=f"layers_{i}")(x, rope)
        x = RMSNorm(c.rms_norm_eps, jnp.dtype(c.param_dtype), name="final_norm")(x)
        logits = Linear(c.vocab_size, c.init_std, jnp.dtype(c.dtype), jnp.dtype(c.param_dtype),
                        name="lm_head")(x)
        return logits.astype(jnp.float32)
