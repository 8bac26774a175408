"""Low-bit optimizer states: block-wise dynamic 8-bit quantization and 8-bit Adam(W).

Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", ICLR
2022, arXiv 2110.02861, as implemented by the official ``bitsandbytes``
(``functional.create_dynamic_map``, ``quantize_blockwise`` and the 8-bit blockwise Adam kernel):

* **Dynamic tree quantization map** (Sec. 2.2/App. F): 256 values in ``[-1, 1]``. For exponent
  ``i = 0 .. 6`` the decade ``10^(i-6)`` holds the midpoints of ``linspace(0.1, 1, k_i + 1)`` with
  ``k_i = 2^i`` (signed map, each value also negated) or ``k_i = 2^(i+1)`` (unsigned map), plus the
  values 0 and 1: small magnitudes get fine steps, large ones coarse steps. The first moment uses
  the signed map, the second moment (non-negative) the unsigned one, as bitsandbytes' Adam8bit.
* **Block-wise quantization** (Sec. 2.1): the flattened tensor is cut into blocks of ``block_size``
  values (2048 in the paper); each block stores its absmax ``N_b = max|x|`` (float32) and, per
  value, the uint8 index of the map entry nearest to ``x / N_b``. Dequantization is
  ``map[code] · N_b``. An outlier only costs precision inside its own block.
* **8-bit Adam** (Sec. 2): every step dequantizes ``m, v``, applies the Adam update in float32
  (``m ← β1 m + (1-β1) g``, ``v ← β2 v + (1-β2) g²``, step ``m̂ / (sqrt(v̂) + eps)`` with the bias
  corrections ``m̂ = m/(1-β1^t)``, ``v̂ = v/(1-β2^t)``), uses the float32 moments of this step for
  the update and re-quantizes them for storage. Tensors with fewer than ``min_size`` values (4096
  as bitsandbytes' ``min_8bit_size``) keep float32 states.

Deviations: bitsandbytes finds the code with a binary search over the sorted map in its CUDA
kernels; here it is the nearest entry (searchsorted over midpoints; a value exactly on a midpoint
goes to the upper entry). Blocks run over the flattened leaf in row-major order; a stacked leaf
``(L, m, n)`` is blocked as one tensor (per-layer training blocks each layer's slice separately).
bitsandbytes' optional percentile clipping and "stable embedding" are not reproduced.

The generic part is :func:`store` / :func:`load`: a moment kept as ``'float32'``, ``'bfloat16'``
or ``'8bit'`` (a :class:`QuantizedArray`) behind one interface, so any transform's moment (e.g.
GaLore's projected ``M, V``) can adopt low-bit storage with two calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrx.optim.engine import from_int_view, int_view

MOMENT_DTYPES = ("float32", "bfloat16", "8bit")


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8
                ) -> np.ndarray:
    """The sorted dynamic tree quantization map of bitsandbytes (``2^total_bits`` float32 values
    in ``[-1, 1]`` for ``signed``, ``[0, 1]`` otherwise); see the module docstring."""
    non_sign_bits = total_bits - 1
    values: list[float] = [0.0, 1.0]
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1))
        edges = np.linspace(0.1, 1.0, items + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 10.0 ** (i - (max_exponent_bits - 1))
        values += list(decade * mids)
        if signed:
            values += list(-decade * mids)
    extra = 2 ** (non_sign_bits - max_exponent_bits) - 1
    if extra > 0:   # exponent bits all zero, no indicator bit (only with fewer exponent bits)
        edges = np.linspace(0.1, 1.0, extra + 1)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = 1.0  # bitsandbytes reuses the last exponent's decade, 10^0
        values += list(decade * mids) + (list(-decade * mids) if signed else [])
    if len(values) > 2 ** total_bits:
        raise ValueError(f"max_exponent_bits={max_exponent_bits} does not fit total_bits="
                         f"{total_bits}")
    values += [0.0] * (2 ** total_bits - len(values))
    return np.sort(np.asarray(values, np.float64)).astype(np.float32)


_MAPS = {True: dynamic_map(True), False: dynamic_map(False)}


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """A block-wise 8-bit quantized array: ``codes`` uint8 ``(..., num_blocks, block_size)`` and
    ``absmax`` float32 ``(..., num_blocks)``; static ``shape`` (of one unbatched array), ``dtype``
    (what :meth:`dequantize` returns) and ``signed`` (which map). Leading axes beyond the
    static shape (e.g. a ``vmap`` over layers) are batch axes. A pytree whose leaves are
    ``codes`` and ``absmax``, so it jits, vmaps, shards and checkpoints like any state."""

    def __init__(self, codes: jax.Array, absmax: jax.Array, shape: tuple[int, ...],
                 dtype: Any = jnp.float32, signed: bool = True):
        self.codes, self.absmax = codes, absmax
        self.shape, self.dtype, self.signed = tuple(shape), jnp.dtype(dtype), bool(signed)

    def tree_flatten(self):
        return (self.codes, self.absmax), (self.shape, self.dtype.name, self.signed)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def block_size(self) -> int:
        return int(self.codes.shape[-1])

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.codes.shape)) + 4 * int(np.prod(self.absmax.shape))

    def dequantize(self) -> jax.Array:
        return dequantize(self)

    def __repr__(self) -> str:
        return (f"QuantizedArray(shape={self.shape}, signed={self.signed}, "
                f"blocks={self.absmax.shape}, block_size={self.block_size})")


def quantize(x: jax.Array, *, signed: bool = True, block_size: int = 2048) -> QuantizedArray:
    """Block-wise dynamic quantization of ``x`` (any shape; flattened row-major, zero-padded to a
    multiple of ``block_size``): per block the float32 absmax and per value the uint8 index of the
    nearest map entry to ``x / absmax``. ``signed=False`` needs ``x >= 0``."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    shape = tuple(x.shape)
    flat = jnp.ravel(x).astype(jnp.float32)
    size = flat.shape[0]
    num_blocks = max(1, -(-size // block_size))
    flat = jnp.pad(flat, (0, num_blocks * block_size - size))
    blocks = flat.reshape(num_blocks, block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    safe = jnp.where(absmax > 0, absmax, 1.0)
    normed = blocks / safe[:, None]
    table = jnp.asarray(_MAPS[bool(signed)])
    midpoints = (table[1:] + table[:-1]) / 2
    codes = jnp.searchsorted(midpoints, normed, side="right").astype(jnp.uint8)
    return QuantizedArray(codes, absmax, shape, x.dtype, signed)


def dequantize(q: QuantizedArray) -> jax.Array:
    """``map[codes] · absmax`` reshaped to ``q.shape`` (leading batch axes kept), in ``q.dtype``."""
    table = jnp.asarray(_MAPS[q.signed])
    values = table[q.codes.astype(jnp.int32)] * q.absmax[..., None]
    batch = q.codes.shape[:-2]
    size = int(np.prod(q.shape, dtype=np.int64))
    flat = values.reshape(*batch, -1)[..., :size]
    return flat.reshape(*batch, *q.shape).astype(q.dtype)


def store(x: jax.Array, moment_dtype: str = "float32", *, signed: bool = True,
          block_size: int = 2048, min_size: int = 4096) -> jax.Array | QuantizedArray:
    """The storage form of a float moment ``x``: ``'float32'`` / ``'bfloat16'`` (a cast) or
    ``'8bit'`` (a :class:`QuantizedArray` with the signed map for ``signed``, the unsigned one for
    non-negative moments such as Adam's ``v``; arrays with fewer than ``min_size`` values stay
    float32, as bitsandbytes). Pair with :func:`load`."""
    check_moment_dtype(moment_dtype)
    if moment_dtype == "8bit":
        if x.size < min_size:
            return x.astype(jnp.float32)
        return quantize(x, signed=signed, block_size=block_size)
    return x.astype(moment_dtype)


def load(stored: jax.Array | QuantizedArray) -> jax.Array:
    """The float32 value of a moment kept by :func:`store`."""
    if isinstance(stored, QuantizedArray):
        return dequantize(stored).astype(jnp.float32)
    return stored.astype(jnp.float32)


def check_moment_dtype(moment_dtype: str) -> None:
    if moment_dtype not in MOMENT_DTYPES:
        raise ValueError(f"moment_dtype={moment_dtype!r}: valid choices are "
                         f"{', '.join(map(repr, MOMENT_DTYPES))}")


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


class ScaleByAdam8bitState(NamedTuple):
    """count: int32 ``[]``; mu, nu: per leaf the stored moment (QuantizedArray or float array)."""

    count: jax.Array
    mu: Any
    nu: Any


def scale_by_adam_8bit(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *,
                       moment_dtype: str = "8bit", block_size: int = 2048,
                       min_size: int = 4096, chunk_blocks: int = 256
                       ) -> optax.GradientTransformation:
    """Adam's direction ``m̂ / (sqrt(v̂) + eps)`` (as ``optax.scale_by_adam``) with the moments
    stored per :func:`store`: block-wise 8-bit (default; signed map for ``m``, unsigned for ``v``),
    ``'bfloat16'`` or ``'float32'``. The update of a step uses its float32 moments before they are
    re-quantized (bitsandbytes' kernel). Leaves of any shape; shapes are preserved. 8-bit leaves
    are processed ``chunk_blocks`` blocks at a time (``lax.map``), so the float32 temporaries of
    the update cover one chunk (512K values by default), not the whole tensor."""
    check_moment_dtype(moment_dtype)
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")

    def keep(x, signed):
        return store(x, moment_dtype, signed=signed, block_size=block_size, min_size=min_size)

    def init_fn(params):
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32)
        return ScaleByAdam8bitState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree_util.tree_map(lambda p: keep(zeros(p), True), params),
            nu=jax.tree_util.tree_map(lambda p: keep(zeros(p), False), params))

    def adam(g32, mu, nu, c1, c2):
        mu = b1 * mu + (1 - b1) * g32
        nu = b2 * nu + (1 - b2) * g32 * g32
        return (mu / c1) / (jnp.sqrt(nu / c2) + eps), mu, nu

    def blockwise(g, mu_q, nu_q, c1, c2):
        """8-bit moments: dequantize, update and re-quantize ``chunk_blocks`` blocks at a time,
        so temporaries hold one chunk, not the whole tensor in float32. A ``fori_loop`` whose
        carries go through ``optimization_barrier`` (so XLA:CPU hoists no float32 copy of the
        whole gradient out of it) and are written in place: the direction over (the uint16 view
        of a 16-bit) gradient, the codes and absmax over the old ones (the state is donated),
        so the update holds no second gradient-sized or state-sized buffer (a ``lax.map`` kept
        its stacked outputs and a float32 copy of the gradient: llama_7b per-layer GaLore 8-bit,
        embedding and LM head)."""
        num_blocks, size = mu_q.codes.shape[0], g.size
        flat = jnp.pad(jnp.ravel(g), (0, num_blocks * block_size - size))
        flat = int_view(flat.reshape(num_blocks, block_size))
        mu_map, nu_map = jnp.asarray(_MAPS[True]), jnp.asarray(_MAPS[False])

        def one(gb, mc, ma, nc, na):
            mu = mu_map[mc.astype(jnp.int32)] * ma[:, None]
            nu = nu_map[nc.astype(jnp.int32)] * na[:, None]
            u, mu, nu = adam(from_int_view(gb, g.dtype).astype(jnp.float32), mu, nu, c1, c2)
            mq, nq = (quantize(mu, signed=True, block_size=block_size),
                      quantize(nu, signed=False, block_size=block_size))
            return (int_view(u.astype(g.dtype)), mq.codes.reshape(mc.shape), mq.absmax,
                    nq.codes.reshape(nc.shape), nq.absmax)

        chunk = min(chunk_blocks, num_blocks)
        carry = (flat, mu_q.codes, mu_q.absmax, nu_q.codes, nu_q.absmax)

        def body(c, carry):
            carry = jax.lax.optimization_barrier(carry)
            start = c * chunk
            part = [jax.lax.dynamic_slice_in_dim(x, start, chunk, 0) for x in carry]
            return tuple(jax.lax.dynamic_update_slice_in_dim(x, y, start, 0)
                         for x, y in zip(carry, one(*part), strict=True))

        full = num_blocks // chunk
        carry = jax.lax.fori_loop(0, full, body, carry)
        if full * chunk < num_blocks:          # the last, partial chunk
            rest = [x[full * chunk:] for x in carry]
            carry = tuple(x.at[full * chunk:].set(y)
                          for x, y in zip(carry, one(*rest), strict=True))
        u, mc, ma, nc, na = carry
        u = from_int_view(u, g.dtype).reshape(-1)[:size].reshape(g.shape)
        return (u, QuantizedArray(mc, ma, mu_q.shape, mu_q.dtype, True),
                QuantizedArray(nc, na, nu_q.shape, nu_q.dtype, False))

    def update_fn(updates, state, params=None):  # noqa: ARG001
        count = optax.safe_int32_increment(state.count)
        t = count.astype(jnp.float32)
        c1, c2 = 1 - jnp.power(b1, t), 1 - jnp.power(b2, t)
        flat_g, treedef = jax.tree_util.tree_flatten(updates)
        flat_mu = treedef.flatten_up_to(state.mu)
        flat_nu = treedef.flatten_up_to(state.nu)
        out, new_mu, new_nu = [], [], []
        for g, mu_s, nu_s in zip(flat_g, flat_mu, flat_nu, strict=True):
            if _is_quantized(mu_s) and mu_s.codes.ndim == 2:
                u, mu, nu = blockwise(g, mu_s, nu_s, c1, c2)
            else:
                u, mu, nu = adam(g.astype(jnp.float32), load(mu_s), load(nu_s), c1, c2)
                u, mu, nu = u.astype(g.dtype), keep(mu, True), keep(nu, False)
            out.append(u)
            new_mu.append(mu)
            new_nu.append(nu)
        return treedef.unflatten(out), ScaleByAdam8bitState(
            count, treedef.unflatten(new_mu), treedef.unflatten(new_nu))

    return optax.GradientTransformation(init_fn, update_fn)


def adamw_8bit(learning_rate: float | Callable, b1: float = 0.9, b2: float = 0.999,
               eps: float = 1e-8, weight_decay: float = 1e-4, *, mask: Any = None,
               moment_dtype: str = "8bit", block_size: int = 2048,
               min_size: int = 4096, chunk_blocks: int = 256) -> optax.GradientTransformation:
    """AdamW with 8-bit states (bitsandbytes' ``AdamW8bit``): :func:`scale_by_adam_8bit`, then
    decoupled weight decay on the leaves selected by ``mask`` and ``-learning_rate`` (a float or an
    optax schedule), the ordering of ``optax.adamw``."""
    return optax.chain(
        scale_by_adam_8bit(b1, b2, eps, moment_dtype=moment_dtype, block_size=block_size,
                           min_size=min_size, chunk_blocks=chunk_blocks),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate))


def state_bytes(tree: Any) -> int:
    """Bytes of the arrays in ``tree`` (quantized arrays count their codes and absmax)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
                   for x in leaves if hasattr(x, "dtype")))
