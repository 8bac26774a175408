"""Factored weights (pytree nodes) and their factories.

All shapes use Flax's ``(in, out)`` kernel layout: the dense weight is ``W: (m, n)`` with
``y = x @ W``; PyTorch's ``nn.Linear.weight`` is ``W.T``, so the torch factor ``A: (r, d_in)``
becomes our ``a = A.T: (m, r)`` and ``B: (d_out, r)`` becomes ``b = B.T: (r, n)``.
Kaiming-uniform below means PyTorch's ``kaiming_uniform_(a=sqrt(5))`` (the ``nn.Linear``
default), i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in = m``.

Methods (paper; official code checked; equations in our layout):

- ``LowRank`` - factorised training from scratch, ``W = u @ v`` (the "Low-Rank" baseline of
  GaLore, arXiv 2403.03507, Table 2 and SLTrain, arXiv 2406.02214, Table 1). Init
  ``'spectral'``: ``u = U_r sqrt(S_r)``, ``v = sqrt(S_r) V_r^T`` of the given dense init (Khodak et
  al., "Initialization and regularization of factorized neural layers", arXiv 2105.01029);
  ``'kaiming'``: ``u`` Kaiming-uniform, ``v = 0`` (SLTrain's low-rank factor init).
- ``LoRA`` - "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., arXiv 2106.09685),
  ``W = W0 + s a @ b`` with ``s = alpha / r`` or, with ``rslora``, ``s = alpha / sqrt(r)``
  ("A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", Kalajdzievski, arXiv
  2312.03732); ``a`` Kaiming-uniform, ``b = 0`` (peft ``LoraConfig`` defaults). ``init='pissa'``
  ("PiSSA", Meng et al., arXiv 2404.02948; peft ``pissa_init``): SVD ``W0 = U S V^T``,
  ``a = U_r sqrt(S_r / s)``, ``b = sqrt(S_r / s) V_r^T`` and the frozen base becomes the residual
  ``W0 - s a b`` (so the step-0 weight equals ``W0``).
- ``DoRA`` - "DoRA: Weight-Decomposed Low-Rank Adaptation" (Liu et al., arXiv 2402.09353), Eq. 5:
  ``W = magnitude * V / ||V||_c`` with ``V = W0 + s a b`` and ``||.||_c`` the L2 norm of each output
  channel (a column of our ``(m, n)`` kernel), treated as a constant in the backward pass (paper
  Sec. 4.3; peft detaches it). ``magnitude`` starts at ``||W0||_c`` so the step-0 weight equals W0.
  ``dot`` reuses ``x @ W0`` and computes the norm from the factors without forming ``a @ b``:
  ``||V_j||^2 = ||W0_j||^2 + 2 s <W0_j, (a b)_j> + s^2 b_j^T (a^T a) b_j``.
- ``SparsePlusLowRank`` - "SLTrain: a sparse plus low-rank approach for parameter and memory
  efficient pretraining" (Han et al., arXiv 2406.02214; andyjm3/SLTrain ``SpLoRaLinear``):
  ``W = s a @ b + S``, ``S`` nonzero on a fixed uniformly random support of
  ``int(density * m * n)`` flat positions (sorted, frozen int32), values trainable and initialised
  ``U(+-1/sqrt(m))``; ``a`` Kaiming-uniform, ``b = 0``, ``s = alpha / r``. Like the official custom
  op, ``dot`` builds the dense ``W`` in the forward pass and rebuilds it in the backward pass
  (``jax.checkpoint``), saving only the input and the factors: the savings are in parameters,
  gradients and optimizer state, not in FLOPs or activations. The official ``trainable_scaling``
  option is not implemented.
- ``NOLA`` - "NOLA: Compressing LoRA using Linear Combination of Random Basis" (Koohpayegani et
  al., arXiv 2310.02556; UCDvision/NOLA ``gpt/src/model_nola.py``): ``W = W0 + s a @ b`` with
  ``a = A0 + sum_i alpha_i A_i`` and ``b = sum_j beta_j B_j``; bases ``U(-1, 1) / sqrt(k)``
  regenerated inside ``jit`` from a per-layer seed (never stored), ``A0`` Kaiming-uniform (also
  regenerated: the official code stores it as a frozen weight), coefficients start at 0,
  ``s = alpha / r``. Deviation: bases come from JAX's threefry PRNG, not torch's generator.
- ``RandLoRA`` - "RandLoRA: Full-rank parameter-efficient fine-tuning of large models" (Albert et
  al., arXiv 2502.00987; peft ``tuners/randlora``): with ``small = min(m, n)``, ``big = max(m, n)``
  and ``N = ceil(small / r)`` bases, the update on the (small, big) orientation is
  ``D = sum_n diag(gamma_n) A^T diag(lambda_{:, n}) B_n^T`` (``W = W0 + s D`` if ``m <= n`` else
  ``W0 + s D^T``); ``A: (r, small)`` is one random matrix shared by the bases (peft's current
  layout; the official code optionally shares it too), ``B_n: (big, r)``, both unit-variance
  uniform (peft: Kaiming-uniform divided by the empirical std; we use the exact std) and shared by
  all layers (sized for the largest and sliced, regenerated from ``projection_prng_key``);
  ``lambda: (r, N)`` starts at 0, ``gamma: (N, small)`` at
  ``1 / max(N, small) = 1 / small`` (peft 0.21 ``RandLoraLayer.reset_randlora_parameters``:
  ``1 / max(gamma.shape)``; ``N <= small`` always). Scaling: peft
  ``s = alpha / r`` (used here; default ``alpha = 20 r`` as peft's docs recommend) vs. the official
  code's ``alpha / r / sqrt(N)``. peft pairs B's columns with A's rows in a different (still
  random) order; we follow the paper's per-basis formula.
- ``VeRA`` - "VeRA: Vector-based Random Matrix Adaptation" (Kopiczko et al., arXiv 2310.11454;
  peft ``tuners/vera``): ``W = W0 + A^T diag(lambda_d) B^T diag(lambda_b)`` (torch:
  ``Lambda_b B Lambda_d A``) with frozen ``A: (r, max_in)`` and ``B: (max_out, r)`` Kaiming-uniform,
  shared by every adapted layer (sized for the largest and sliced ``A[:, :m]``, ``B[:n]``) and
  regenerated from ``projection_prng_key``; ``lambda_d = d_initial = 0.1``, ``lambda_b = 0``; no
  scaling factor.

Factories are frozen, typed dataclasses (``LoRAFactory(rank=8, alpha=16)``; lower-case aliases
``lora``, ``dora``, ...) that validate their hyperparameters at construction and build a node
with ``factory(key, w)``.

Random bases are regenerated with ``jax.random`` from integer seeds stored as static metadata; the
values depend on JAX's PRNG implementation (threefry, ``jax_threefry_partitionable``), so record
the JAX version with checkpoints of these methods.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lrx.param.core import Factored, frozen, register_node, static, trainable

Array = jax.Array


# --------------------------------------------------------------------------------------------
# helpers


def _uniform(key: Array, shape: tuple[int, ...], bound: float, dtype: Any) -> Array:
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _kaiming(key: Array, shape: tuple[int, ...], fan_in: int, dtype: Any) -> Array:
    """PyTorch ``kaiming_uniform_(a=sqrt(5))``: ``U(+-1/sqrt(fan_in))``."""
    return _uniform(key, shape, 1.0 / math.sqrt(fan_in), dtype)


def _seed_from_key(key: Array) -> int:
    """A Python int seed from a (concrete) PRNG key."""
    try:
        return int(jax.random.randint(key, (), 0, 2**31 - 1))
    except jax.errors.ConcretizationTypeError:
        raise ValueError("seed-based parameterizations (nola) need a concrete PRNG key: call the "
                         "factory / lrx.param.apply outside jax.jit") from None


def _check_matrix(w: Any, method: str) -> tuple[int, int]:
    shape = tuple(getattr(w, "shape", np.shape(w)))
    if len(shape) != 2:
        raise ValueError(f"{method}: expects a 2-D (in, out) weight matrix, got shape {shape}")
    return shape  # type: ignore[return-value]


def _check_rank(rank: Any, method: str) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank <= 0:
        raise ValueError(f"{method}: rank must be a positive integer, got {rank!r}")
    return int(rank)


def _check_rank_fits(rank: int, shape: tuple[int, int], method: str) -> None:
    if rank > min(shape):
        raise ValueError(f"{method}: rank={rank} exceeds min(in, out)={min(shape)} of the "
                         f"{shape} weight; choose 1 <= rank <= {min(shape)}")


def _check_choice(value: Any, choices: Sequence[str], name: str, method: str) -> None:
    if value not in choices:
        valid = ", ".join(map(repr, choices))
        raise ValueError(f"{method}: {name}={value!r} is not one of {valid}")


def _f32(x: Array) -> Array:
    return x.astype(jnp.float32)


def _top_r_split(w: Array, rank: int, divide: float) -> tuple[Array, Array]:
    """``(U_r sqrt(S_r/divide), sqrt(S_r/divide) V_r^T)`` of ``w`` (SVD in float32)."""
    u, s, vt = jnp.linalg.svd(_f32(w), full_matrices=False)
    root = jnp.sqrt(s[:rank] / divide)
    return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


# --------------------------------------------------------------------------------------------
# nodes


@register_node
class LowRank(Factored):
    """``W = u @ v``; ``u: (m, r)``, ``v: (r, n)`` both trainable (no frozen part)."""

    shape: tuple[int, int] = static()
    u: Array = trainable()
    v: Array = trainable()

    def materialize(self) -> Array:
        return self.u @ self.v

    def dot(self, x: Array) -> Array:
        return (x @ self.u.astype(x.dtype)) @ self.v.astype(x.dtype)


@register_node
class LoRA(Factored):
    """``W = base + scale * a @ b``; ``base: (m, n)`` frozen, ``a: (m, r)``, ``b: (r, n)``
    trainable. ``init`` ('default', 'pissa', 'olora', or the data-driven 'lora_ga' / 'eva' of
    :mod:`lrx.param.methods`) records how the adapter was initialised (used by
    :func:`lrx.param.merge_and_reinit`)."""

    shape: tuple[int, int] = static()
    base: Array = frozen()
    a: Array = trainable()
    b: Array = trainable()
    scale: float = static(1.0)
    init: str = static("default")

    def materialize(self) -> Array:
        return self.base + self.scale * (self.a @ self.b)

    def dot(self, x: Array) -> Array:
        dt = x.dtype
        return x @ self.base.astype(dt) + self.scale * ((x @ self.a.astype(dt)) @ self.b.astype(dt))


@register_node
class DoRA(Factored):
    """``W = magnitude * V / stop_gradient(||V||_c)``, ``V = base + scale * a @ b``; ``base``
    frozen; ``a: (m, r)``, ``b: (r, n)``, ``magnitude: (n,)`` trainable."""

    shape: tuple[int, int] = static()
    base: Array = frozen()
    a: Array = trainable()
    b: Array = trainable()
    magnitude: Array = trainable()
    scale: float = static(1.0)

    def column_norm(self) -> Array:
        """``||base + scale a b||`` per output channel ``(n,)`` in float32, from the factors,
        without gradient."""
        base, a, b = (jax.lax.stop_gradient(_f32(t)) for t in (self.base, self.a, self.b))
        s = self.scale
        cross = jnp.sum((base.T @ a) * b.T, axis=1)                 # <W0_j, (a b)_j>
        lowrank = jnp.sum(b * ((a.T @ a) @ b), axis=0)              # ||(a b)_j||^2
        sq = jnp.sum(base * base, axis=0) + 2.0 * s * cross + s * s * lowrank
        return jnp.sqrt(jnp.maximum(sq, 0.0))

    def materialize(self) -> Array:
        v = self.base + self.scale * (self.a @ self.b)
        norm = jax.lax.stop_gradient(jnp.linalg.norm(_f32(v), axis=0))
        return (v * (self.magnitude / norm)[None, :].astype(v.dtype)).astype(v.dtype)

    def dot(self, x: Array) -> Array:
        dt = x.dtype
        y = x @ self.base.astype(dt) + self.scale * ((x @ self.a.astype(dt)) @ self.b.astype(dt))
        return y * (_f32(self.magnitude) / self.column_norm()).astype(dt)


@register_node
class SparsePlusLowRank(Factored):
    """SLTrain: ``W = scale * a @ b + S``; ``a: (m, r)``, ``b: (r, n)``, ``values: (nnz,)``
    trainable. The support of ``S`` (``nnz`` sorted flat row-major positions in ``(m, n)``) is
    regenerated on the host from the static ``seed`` (:attr:`indices`), so it is a compile-time
    constant under ``jit`` and no integer leaf sits in the tree."""

    shape: tuple[int, int] = static()
    a: Array = trainable()
    b: Array = trainable()
    values: Array = trainable()
    seed: int = static(0)
    nnz: int = static(1)
    scale: float = static(1.0)

    @property
    def indices(self) -> np.ndarray:
        """``(nnz,)`` int32 sorted flat positions of the support (NumPy, from ``seed``)."""
        return sparse_support(self.seed, self.shape, self.nnz)

    def materialize(self) -> Array:
        return _sltrain_dense(self.a, self.b, self.values, self.indices, self.scale, self.shape)

    def dot(self, x: Array) -> Array:
        return _sltrain_dot(x, self.a, self.b, self.values, self.indices, self.scale, self.shape)

    def generated_size(self) -> int:
        return self.nnz


@functools.lru_cache(maxsize=256)
def sparse_support(seed: int, shape: tuple[int, int], nnz: int) -> np.ndarray:
    """``nnz`` distinct flat positions of an ``(m, n)`` matrix drawn uniformly without replacement
    by NumPy's PCG64 generator seeded with ``seed``, sorted, int32 (read-only, cached)."""
    m, n = shape
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(m * n, size=nnz, replace=False)).astype(np.int32)
    idx.setflags(write=False)
    return idx


def _sltrain_dense(a, b, values, indices, scale, shape):
    w = (scale * (a @ b)).reshape(-1)
    return w.at[indices].add(values.astype(w.dtype)).reshape(shape)


def _sltrain_dot(x, a, b, values, indices, scale, shape):
    # Rebuild W in the backward pass instead of storing it (the official op saves only the input
    # and the factors).
    def f(x, a, b, values):
        w = _sltrain_dense(a.astype(x.dtype), b.astype(x.dtype), values, indices, scale, shape)
        return x @ w

    return jax.checkpoint(f)(x, a, b, values)


@register_node
class NOLA(Factored):
    """``W = base + scale * a @ b`` with ``a = A0 + sum_i alpha_i A_i`` and
    ``b = sum_j beta_j B_j`` regenerated from ``seed``; ``base`` frozen; ``alpha: (k,)``,
    ``beta: (l,)`` trainable."""

    shape: tuple[int, int] = static()
    base: Array = frozen()
    alpha: Array = trainable()
    beta: Array = trainable()
    seed: int = static(0)
    rank: int = static(1)
    scale: float = static(1.0)

    def bases(self) -> tuple[Array, Array, Array]:
        """``(A0: (m, r), A: (k, m, r), B: (l, r, n))`` in float32, regenerated from ``seed``."""
        m, n = self.shape
        r, k, l_ = self.rank, self.alpha.shape[0], self.beta.shape[0]
        key = jax.random.key(self.seed)
        k0, ka, kb = (jax.random.fold_in(key, i) for i in range(3))
        a0 = _kaiming(k0, (m, r), m, jnp.float32)
        basis_a = _uniform(ka, (k, m, r), 1.0, jnp.float32) / math.sqrt(k)
        basis_b = _uniform(kb, (l_, r, n), 1.0, jnp.float32) / math.sqrt(l_)
        return a0, basis_a, basis_b

    def factors(self) -> tuple[Array, Array]:
        """``(a: (m, r), b: (r, n))`` in float32."""
        a0, basis_a, basis_b = self.bases()
        a = a0 + jnp.einsum("k,kmr->mr", _f32(self.alpha), basis_a)
        b = jnp.einsum("l,lrn->rn", _f32(self.beta), basis_b)
        return a, b

    def materialize(self) -> Array:
        a, b = self.factors()
        return (self.base + self.scale * (a @ b)).astype(self.base.dtype)

    def dot(self, x: Array) -> Array:
        dt = x.dtype
        a, b = self.factors()
        return x @ self.base.astype(dt) + self.scale * ((x @ a.astype(dt)) @ b.astype(dt))

    def generated_size(self) -> int:
        m, n = self.shape
        k, l_ = self.alpha.shape[0], self.beta.shape[0]
        return m * self.rank + k * m * self.rank + l_ * self.rank * n


@register_node
class VeRA(Factored):
    """``W = base + A_m^T diag(lambda_d) B_n^T diag(lambda_b)``; shared random ``A: (r, max_in)``,
    ``B: (max_out, r)`` regenerated from ``seed`` and sliced; ``base`` frozen;
    ``lambda_d: (r,)``, ``lambda_b: (n,)`` trainable."""

    shape: tuple[int, int] = static()
    base: Array = frozen()
    lambda_b: Array = trainable()
    lambda_d: Array = trainable()
    seed: int = static(0)
    rank: int = static(1)
    max_shape: tuple[int, int] = static((0, 0))

    def shared_bases(self) -> tuple[Array, Array]:
        """The full shared ``(A: (r, max_in), B: (max_out, r))`` in float32.

        peft ``tuners/vera/model.py`` ``_kaiming_init``: gain ``sqrt(2)`` Kaiming-uniform,
        ``U(+-sqrt(6 / fan_in))`` with torch's ``fan_in`` = the second dimension (``max_in`` for
        ``A``, ``r`` for ``B``), not the ``a = sqrt(5)`` variant of ``nn.Linear``."""
        max_in, max_out = self.max_shape
        ka, kb = jax.random.split(jax.random.key(self.seed))
        return (_uniform(ka, (self.rank, max_in), math.sqrt(6.0 / max_in), jnp.float32),
                _uniform(kb, (max_out, self.rank), math.sqrt(6.0 / self.rank), jnp.float32))

    def factors(self) -> tuple[Array, Array]:
        """This layer's slices in our layout: ``(A[:, :m].T: (m, r), B[:n].T: (r, n))``."""
        m, n = self.shape
        a_full, b_full = self.shared_bases()
        return a_full[:, :m].T, b_full[:n].T

    def materialize(self) -> Array:
        a, b = self.factors()
        delta = ((a * _f32(self.lambda_d)[None, :]) @ b) * _f32(self.lambda_b)[None, :]
        return (self.base + delta).astype(self.base.dtype)

    def dot(self, x: Array) -> Array:
        dt = x.dtype
        a, b = self.factors()
        h = (x @ a.astype(dt)) * self.lambda_d.astype(dt)
        return x @ self.base.astype(dt) + (h @ b.astype(dt)) * self.lambda_b.astype(dt)

    def generated_size(self) -> int:
        return self.rank * (self.max_shape[0] + self.max_shape[1])


def _randlora_num_bases(small: int, rank: int) -> int:
    return -(-small // rank)


@register_node
class RandLoRA(Factored):
    """``W = base + scale * D`` (``D^T`` if ``m > n``), ``D = sum_n diag(gamma_n) A^T
    diag(lambda_{:, n}) B_n^T: (small, big)``; shared random ``A: (r, small_max)`` and
    ``B: (N_max, big_max, r)`` regenerated from ``seed`` and sliced; ``base`` frozen;
    ``lam: (r, N)``, ``gamma: (N, small)`` trainable."""

    shape: tuple[int, int] = static()
    base: Array = frozen()
    lam: Array = trainable()
    gamma: Array = trainable()
    seed: int = static(0)
    rank: int = static(1)
    scale: float = static(1.0)
    max_shape: tuple[int, int] = static((0, 0))   # (big_max, small_max) over the shared layers

    def shared_bases(self) -> tuple[Array, Array]:
        """The full shared ``(A: (r, small_max), B: (N_max, big_max, r))``, unit variance."""
        big_max, small_max = self.max_shape
        n_max = _randlora_num_bases(small_max, self.rank)
        ka, kb = jax.random.split(jax.random.key(self.seed))
        bound = math.sqrt(3.0)  # U(-sqrt(3), sqrt(3)) has unit variance
        return (_uniform(ka, (self.rank, small_max), bound, jnp.float32),
                _uniform(kb, (n_max, big_max, self.rank), bound, jnp.float32))

    def bases(self) -> tuple[Array, Array]:
        """This layer's ``(A: (r, small), B: (N, big, r))``."""
        small, big = min(self.shape), max(self.shape)
        a_full, b_full = self.shared_bases()
        return a_full[:, :small], b_full[: self.lam.shape[1], :big]

    def delta_small_big(self) -> Array:
        """``D: (small, big)`` (unscaled), float32."""
        a, b = self.bases()
        return jnp.einsum("ns,rs,rn,nbr->sb", _f32(self.gamma), a, _f32(self.lam), b)

    def materialize(self) -> Array:
        d = self.delta_small_big()
        if self.shape[0] > self.shape[1]:
            d = d.T
        return (self.base + self.scale * d).astype(self.base.dtype)

    def dot(self, x: Array) -> Array:
        dt = x.dtype
        small = min(self.shape)
        tokens = math.prod(x.shape[:-1])
        if tokens >= small:
            # Per token the factored product costs ~small * (m + n) FLOPs (more than the dense
            # m * n); building the update once per call is cheaper here.
            return x @ self.materialize().astype(dt)
        a, b = (t.astype(dt) for t in self.bases())
        lam, gamma = self.lam.astype(dt), self.gamma.astype(dt)
        y = x @ self.base.astype(dt)
        if self.shape[0] <= self.shape[1]:   # x lives on the small side
            u = jnp.einsum("...s,ns,rs->...nr", x, gamma, a) * lam.T
            return y + self.scale * jnp.einsum("...nr,nbr->...b", u, b)
        u = jnp.einsum("...b,nbr->...nr", x, b) * lam.T
        return y + self.scale * jnp.einsum("...nr,rs,ns->...s", u, a, gamma)

    def generated_size(self) -> int:
        big_max, small_max = self.max_shape
        num = _randlora_num_bases(small_max, self.rank)
        return self.rank * small_max + num * big_max * self.rank


NODE_TYPES = (LowRank, LoRA, DoRA, SparsePlusLowRank, NOLA, RandLoRA, VeRA)


# --------------------------------------------------------------------------------------------
# factories: frozen typed dataclasses holding a method's hyperparameters; (key, w) -> node


def _positive_or_none(value: Any, name: str, method: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{method}: {name} must be a positive number, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Factory:
    """Base of the parameterization factories: a frozen dataclass of one method's hyperparameters
    (validated at construction) whose call ``factory(key, w: (m, n)) -> node`` builds the factored
    weight of a dense matrix. ``bind_shapes(shapes)`` returns the factory to use for a group of
    matrices that share random bases (VeRA, RandLoRA); other methods return ``self``."""

    method: ClassVar[str] = ""

    def bind_shapes(self, shapes: Sequence[tuple[int, int]]) -> Factory:  # noqa: ARG002
        return self

    def __call__(self, key: Array, w: Array) -> Factored:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def hyperparameters(cls) -> tuple[dataclasses.Field, ...]:
        """The user-facing fields (those ``lrx.param.factory`` accepts)."""
        return tuple(f for f in dataclasses.fields(cls) if not f.metadata.get("internal"))


def _internal(default: Any) -> Any:
    """A field set by :meth:`Factory.bind_shapes`, not by users."""
    return dataclasses.field(default=default, repr=False, metadata={"internal": True})


def _alpha_or_rank(alpha: float | None, rank: int) -> float:
    return float(rank) if alpha is None else float(alpha)


@dataclasses.dataclass(frozen=True)
class LowRankFactory(Factory):
    """Factorised weight ``W = u @ v`` of rank ``rank`` (trained from scratch).

    Attributes:
      rank: ``1 <= rank <= min(m, n)``.
      init: ``'spectral'`` (top-``rank`` SVD of the given dense init, split ``sqrt(S)`` to both
        factors) or ``'kaiming'`` (``u`` Kaiming-uniform, ``v = 0``).
    """

    rank: int
    init: str = "spectral"
    method: ClassVar[str] = "lowrank"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _check_choice(self.init, ("spectral", "kaiming"), "init", self.method)

    def __call__(self, key: Array, w: Array) -> LowRank:
        shape = _check_matrix(w, self.method)
        _check_rank_fits(self.rank, shape, self.method)
        w = jnp.asarray(w)
        if self.init == "spectral":
            u, v = _top_r_split(w, self.rank, 1.0)
        else:
            u = _kaiming(key, (shape[0], self.rank), shape[0], jnp.float32)
            v = jnp.zeros((self.rank, shape[1]), jnp.float32)
        return LowRank(shape=shape, u=u.astype(w.dtype), v=v.astype(w.dtype))


LORA_INITS = ("default", "pissa", "olora")


@dataclasses.dataclass(frozen=True)
class LoRAFactory(Factory):
    """LoRA adapter on the frozen dense weight: ``W = W0 + s a @ b``.

    Attributes:
      rank: ``1 <= rank <= min(m, n)``.
      alpha: scaling numerator; ``None`` means ``alpha = rank`` (``s = 1``, as peft's defaults
        ``r = lora_alpha = 8``).
      rslora: ``s = alpha / sqrt(rank)`` instead of ``alpha / rank``.
      init: ``'default'`` (``a`` Kaiming-uniform, ``b = 0``), ``'pissa'`` or ``'olora'`` (see
        :func:`lora_init`).
    """

    rank: int
    alpha: float | None = None
    rslora: bool = False
    init: str = "default"
    method: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _positive_or_none(self.alpha, "alpha", self.method)
        _check_choice(self.init, LORA_INITS, "init", self.method)

    @property
    def scale(self) -> float:
        alpha = _alpha_or_rank(self.alpha, self.rank)
        return alpha / math.sqrt(self.rank) if self.rslora else alpha / self.rank

    def __call__(self, key: Array, w: Array) -> LoRA:
        shape = _check_matrix(w, self.method)
        _check_rank_fits(self.rank, shape, self.method)
        base, a, b = lora_init(key, jnp.asarray(w), self.rank, self.scale, self.init)
        return LoRA(shape=shape, base=base, a=a, b=b, scale=self.scale, init=self.init)


def lora_init(key: Array, w: Array, rank: int, scale: float, init: str
              ) -> tuple[Array, Array, Array]:
    """``(base: (m, n), a: (m, r), b: (r, n))`` for a LoRA adapter of ``w: (m, n)``.

    - ``'default'``: ``base = w``, ``a`` Kaiming-uniform, ``b = 0`` (peft
      ``reset_lora_parameters``).
    - ``'pissa'``: the top-``rank`` SVD part moves into ``a, b`` (peft ``pissa_init``).
    - ``'olora'``: "OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models" (Büyükakyüz,
      arXiv 2406.01775; peft ``LoraLayer.olora_init``): QR of the torch-layout weight
      ``W^T = Q R``; torch ``B = Q[:, :r]``, ``A = R[:r]`` (no division by ``s``), i.e. ours
      ``a = R[:r]^T``, ``b = Q[:, :r]^T``, and ``base = w - s a b``.

    In every case ``base + s a b = w`` at init (up to float32 rounding).
    """
    m, n = w.shape
    if init == "pissa":
        a, b = _top_r_split(w, rank, scale)
    elif init == "olora":
        q, r = jnp.linalg.qr(_f32(w).T)          # (n, k), (k, m)
        a, b = r[:rank].T, q[:, :rank].T
    else:
        return w, _kaiming(key, (m, rank), m, w.dtype), jnp.zeros((rank, n), w.dtype)
    base = _f32(w) - scale * (a @ b)
    return base.astype(w.dtype), a.astype(w.dtype), b.astype(w.dtype)


@dataclasses.dataclass(frozen=True)
class DoRAFactory(Factory):
    """DoRA: ``W = m * V / ||V||_c``, ``V = W0 + (alpha / rank) a @ b``.

    Attributes:
      rank: ``1 <= rank <= min(m, n)``.
      alpha: ``None`` means ``alpha = rank``.
    """

    rank: int
    alpha: float | None = None
    method: ClassVar[str] = "dora"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _positive_or_none(self.alpha, "alpha", self.method)

    def __call__(self, key: Array, w: Array) -> DoRA:
        shape = _check_matrix(w, self.method)
        _check_rank_fits(self.rank, shape, self.method)
        w = jnp.asarray(w)
        magnitude = jnp.linalg.norm(_f32(w), axis=0).astype(w.dtype)
        return DoRA(shape=shape, base=w,
                    a=_kaiming(key, (shape[0], self.rank), shape[0], w.dtype),
                    b=jnp.zeros((self.rank, shape[1]), w.dtype), magnitude=magnitude,
                    scale=_alpha_or_rank(self.alpha, self.rank) / self.rank)


@dataclasses.dataclass(frozen=True)
class SLTrainFactory(Factory):
    """SLTrain sparse plus low-rank weight ``W = (alpha / rank) a @ b + S`` (from scratch).

    Attributes:
      rank: ``1 <= rank <= min(m, n)``.
      alpha: ``None`` means ``alpha = rank``; the paper's LLaMA scripts use 32 (60M, r=128), 16
        (130M/350M, r=256), 8 (1B, r=512).
      density: fraction ``delta`` of nonzeros of ``S``, ``0 < density < 1`` (0.03 in the paper).
    """

    rank: int
    alpha: float | None = None
    density: float = 0.03
    method: ClassVar[str] = "sltrain"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _positive_or_none(self.alpha, "alpha", self.method)
        d = self.density
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d < 1:
            raise ValueError(f"sltrain: density must be in (0, 1), got {d!r}")

    def __call__(self, key: Array, w: Array) -> SparsePlusLowRank:
        shape = _check_matrix(w, self.method)
        m, n = shape
        _check_rank_fits(self.rank, shape, self.method)
        nnz = int(self.density * m * n)
        if nnz < 1:
            raise ValueError(f"sltrain: density={self.density} gives no nonzero in the {shape} "
                             f"weight (int(density * m * n) = 0); raise the density")
        if m * n >= 2**31:
            raise ValueError(f"sltrain: the {shape} weight has >= 2**31 entries; int32 indices "
                             "cannot address it")
        dtype = jnp.asarray(w).dtype
        k_a, k_support, k_values = jax.random.split(key, 3)
        return SparsePlusLowRank(
            shape=shape, a=_kaiming(k_a, (m, self.rank), m, dtype),
            b=jnp.zeros((self.rank, n), dtype),
            values=_uniform(k_values, (nnz,), 1.0 / math.sqrt(m), dtype),
            seed=_seed_from_key(k_support), nnz=nnz,
            scale=_alpha_or_rank(self.alpha, self.rank) / self.rank)


@dataclasses.dataclass(frozen=True)
class NOLAFactory(Factory):
    """NOLA: LoRA factors as linear combinations of ``num_basis_a`` / ``num_basis_b`` random
    bases regenerated from a per-layer seed.

    Attributes:
      rank: ``1 <= rank <= min(m, n)``.
      num_basis_a, num_basis_b: numbers ``k``, ``l`` of random bases of ``a`` and ``b``.
      alpha: ``None`` means ``alpha = rank``.
    """

    rank: int
    num_basis_a: int = 1024
    num_basis_b: int = 1024
    alpha: float | None = None
    method: ClassVar[str] = "nola"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        for name in ("num_basis_a", "num_basis_b"):
            _check_rank(getattr(self, name), f"nola ({name})")
        _positive_or_none(self.alpha, "alpha", self.method)

    def __call__(self, key: Array, w: Array) -> NOLA:
        shape = _check_matrix(w, self.method)
        _check_rank_fits(self.rank, shape, self.method)
        w = jnp.asarray(w)
        return NOLA(shape=shape, base=w, alpha=jnp.zeros((self.num_basis_a,), w.dtype),
                    beta=jnp.zeros((self.num_basis_b,), w.dtype), seed=_seed_from_key(key),
                    rank=self.rank, scale=_alpha_or_rank(self.alpha, self.rank) / self.rank)


@dataclasses.dataclass(frozen=True)
class RandLoRAFactory(Factory):
    """RandLoRA: full-rank update from ``ceil(min(m, n) / rank)`` shared random bases scaled by
    trainable diagonals.

    Attributes:
      rank: rank ``r`` of each basis (may exceed ``min(m, n)``).
      alpha: ``None`` means ``alpha = 20 * rank`` (peft: 640 for r = 32); ``s = alpha / rank``.
      projection_prng_key: seed of the shared bases.
    """

    rank: int = 32
    alpha: float | None = None
    projection_prng_key: int = 0
    max_shape: tuple[int, int] | None = _internal(None)   # (big_max, small_max)
    method: ClassVar[str] = "randlora"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _positive_or_none(self.alpha, "alpha", self.method)
        if isinstance(self.projection_prng_key, bool) or not isinstance(
                self.projection_prng_key, int | np.integer):
            raise ValueError(f"randlora: projection_prng_key must be an integer, got "
                             f"{self.projection_prng_key!r}")

    def bind_shapes(self, shapes: Sequence[tuple[int, int]]) -> RandLoRAFactory:
        shapes = list(shapes)
        if not shapes:
            return self
        return dataclasses.replace(self, max_shape=(max(max(s) for s in shapes),
                                                    max(min(s) for s in shapes)))

    def __call__(self, key: Array, w: Array) -> RandLoRA:  # noqa: ARG002 - shared bases
        shape = _check_matrix(w, self.method)
        small, big = min(shape), max(shape)
        max_shape = self.max_shape or (big, small)
        if big > max_shape[0] or small > max_shape[1]:
            raise ValueError(f"randlora: the {shape} weight does not fit the shared bases sized "
                             f"for (max, min) = {max_shape}")
        num = _randlora_num_bases(small, self.rank)
        w = jnp.asarray(w)
        alpha = 20.0 * self.rank if self.alpha is None else float(self.alpha)
        return RandLoRA(shape=shape, base=w, lam=jnp.zeros((self.rank, num), w.dtype),
                        gamma=jnp.full((num, small), 1.0 / max(num, small), w.dtype),
                        seed=int(self.projection_prng_key), rank=self.rank,
                        scale=alpha / self.rank, max_shape=max_shape)


@dataclasses.dataclass(frozen=True)
class VeRAFactory(Factory):
    """VeRA: frozen shared random ``A, B`` (regenerated from ``projection_prng_key``, sized for
    the largest matrix matched by the same rule) and trainable scaling vectors
    ``lambda_d = d_initial``, ``lambda_b = 0`` (peft defaults).

    Attributes:
      rank: shared rank ``r`` (may exceed ``min(m, n)``; peft default 256).
      d_initial: initial value of ``lambda_d``.
      projection_prng_key: seed of the shared bases.
    """

    rank: int = 256
    d_initial: float = 0.1
    projection_prng_key: int = 0
    max_shape: tuple[int, int] | None = _internal(None)   # (max_in, max_out)
    method: ClassVar[str] = "vera"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        if isinstance(self.d_initial, bool) or not isinstance(self.d_initial, int | float):
            raise ValueError(f"vera: d_initial must be a number, got {self.d_initial!r}")

    def bind_shapes(self, shapes: Sequence[tuple[int, int]]) -> VeRAFactory:
        shapes = list(shapes)
        if not shapes:
            return self
        return dataclasses.replace(self, max_shape=(max(s[0] for s in shapes),
                                                    max(s[1] for s in shapes)))

    def __call__(self, key: Array, w: Array) -> VeRA:  # noqa: ARG002 - shared bases
        shape = _check_matrix(w, self.method)
        max_shape = self.max_shape or shape
        if shape[0] > max_shape[0] or shape[1] > max_shape[1]:
            raise ValueError(f"vera: the {shape} weight does not fit the shared bases sized for "
                             f"{max_shape}")
        w = jnp.asarray(w)
        return VeRA(shape=shape, base=w, lambda_b=jnp.zeros((shape[1],), w.dtype),
                    lambda_d=jnp.full((self.rank,), float(self.d_initial), w.dtype),
                    seed=int(self.projection_prng_key), rank=self.rank, max_shape=max_shape)


# Lower-case aliases: ``lrx.param.lora(8, alpha=16)`` is ``LoRAFactory(rank=8, alpha=16)``.
lowrank = LowRankFactory
lora = LoRAFactory
dora = DoRAFactory
sltrain = SLTrainFactory
nola = NOLAFactory
randlora = RandLoRAFactory
vera = VeRAFactory

FACTORIES: dict[str, type[Factory]] = {
    f.method: f for f in (LowRankFactory, LoRAFactory, DoRAFactory, SLTrainFactory, NOLAFactory,
                          RandLoRAFactory, VeRAFactory)}
