"""Subspace machinery shared by GaLore, FRUGAL and Fira: layouts, side choice, projectors.

A projected leaf is viewed as a stack of independent matrices ``G (B, m, n)``: ``B`` is the product
of its batch axes (e.g. the layer axis of a scanned ``(L, m, n)`` stack), ``m`` of its row axes and
``n`` of its column axes (:class:`DimensionNumbers`; the default is "last two axes are the matrix,
every leading axis is a batch axis").

Projectors are stored as orthonormal column blocks:

* left side: ``P (B, m, r)``, ``R = Pᵀ G (B, r, n)``, back-projection ``P N``;
* right side: ``Q (B, n, r)`` (GaLore's ``Vh[:r]`` transposed), ``R = G Q (B, m, r)``,
  back ``N Qᵀ``;
* full (two-sided): both, ``R = Pᵀ G Q (B, r, r)``.

Side rules follow the official GaLore ``GaLoreProjector`` (Zhao et al., "GaLore: Memory-Efficient
LLM Training by Gradient Low-Rank Projection", arXiv 2403.03507) *for the same physical layer*. The
official code looks at a PyTorch ``(out, in)`` weight and projects with ``Vh[:r]`` (the input
dimension) when ``out >= in`` under ``std``. lrx states the rule in terms of
:class:`DimensionNumbers`: ``m`` is the size of the reduction (input) axes, ``n`` of the output
axes, and the matrix is viewed as ``(m, n)`` (a Flax ``(in, out)`` kernel as stored; a PyTorch
``(out, in)`` weight with ``DimensionNumbers(reduction=(-1,), output=(-2,))`` is transposed to it):

============  ===============================  ===============================
proj_type     n >= m (out >= in; ties)         n < m (out < in)
============  ===============================  ===============================
std           left: project the input axes     right: project the output axes
reverse_std   right: project the output axes   left: project the input axes
left / right  always that side of ``(m, n)``   always that side
full          two-sided (state r x r)          two-sided
============  ===============================  ===============================

So on a tie (square layer) ``std`` projects the reduction (input) axes and ``reverse_std`` the
output axes, exactly as the official code does on the PyTorch weight of that layer. ``std`` puts the
projector on the smaller dimension (projector ``r·min(m, n)``, moments ``2·r·max(m, n)``);
``reverse_std`` (the rule ``optax.contrib.galore`` hard-codes) puts it on the larger one and needs
less optimizer memory. ``left``/``right`` refer to the ``(m, n)`` view.

Projector backends (``projector=``):

* ``'svd'``: top-r singular vectors of the float32 thin SVD of the current gradient (official;
  lrx fixes each vector's sign so its largest-magnitude entry is positive, which makes refreshes
  reproducible across backends where the official code inherits LAPACK's arbitrary signs).
* ``'randomized'``: randomized range finder (Halko, Martinsson & Tropp, "Finding structure with
  randomness", arXiv 0909.4061, Alg. 4.4 with ``power_iters`` subspace iterations),
  ``r + oversample`` Gaussian probes, then the top-r directions of the sketch from a small
  ``(r+p) x (r+p)`` eigenproblem. Optionally warm-started from the previous projector.
* ``'random'``: a seeded random orthonormal basis (QR of a Gaussian; GoLore arXiv 2410.11289,
  FRUGAL's ``random``).
* ``'randperm'``: r distinct coordinate axes as a one-hot basis (FRUGAL's ``randperm``; with the
  side fixed it also gives FRUGAL's ``columns``/``rows`` coordinate choice).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("svd", "randomized", "random")
SIDES = ("left", "right", "full")


def check_choice(value: str, choices: Sequence[str], name: str) -> None:
    """Raises ValueError naming ``name`` and the valid choices if ``value`` is not one of them."""
    if value not in choices:
        valid = ", ".join(map(repr, choices))
        raise ValueError(f"{name}={value!r} is not valid; choose one of {valid}")


@dataclasses.dataclass(frozen=True)
class DimensionNumbers:
    """Which axes of a leaf form the rows, the columns and the batch of independent matrices.

    ``reduction`` axes are flattened into the rows ``m``, ``output`` axes into the columns ``n`` and
    ``batch`` axes into ``B`` (each batch entry is its own matrix with its own projector). Every
    axis must appear exactly once. Example: an attention kernel ``(embed, heads, head_dim)`` as one
    ``embed x (heads·head_dim)`` matrix is ``DimensionNumbers(reduction=(0,), output=(1, 2))``; a
    scanned stack ``(L, embed, heads, head_dim)`` adds ``batch=(0,)``.
    """

    reduction: tuple[int, ...] = (-2,)
    output: tuple[int, ...] = (-1,)
    batch: tuple[int, ...] | None = None   # None: every axis not in reduction/output

    def axes(self, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """Normalised (batch, reduction, output) axes for a leaf of rank ``ndim``."""
        def norm(axes):
            out = []
            for a in axes:
                if not -ndim <= a < ndim:
                    raise ValueError(f"DimensionNumbers axis {a} is out of range for a leaf with "
                                     f"{ndim} axes")
                out.append(a % ndim)
            return tuple(out)

        red, outp = norm(self.reduction), norm(self.output)
        if not red or not outp:
            raise ValueError("DimensionNumbers needs at least one reduction and one output axis")
        if self.batch is None:
            batch = tuple(a for a in range(ndim) if a not in red + outp)
        else:
            batch = norm(self.batch)
        allaxes = batch + red + outp
        if sorted(allaxes) != list(range(ndim)):
            raise ValueError(f"DimensionNumbers(batch={batch}, reduction={red}, output={outp}) "
                             f"must name every axis of a {ndim}-axis leaf exactly once")
        return batch, red, outp


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static view of one leaf as ``(B, m, n)``: the permutation and the shapes to undo it."""

    perm: tuple[int, ...]
    permuted_shape: tuple[int, ...]
    batch: int
    m: int
    n: int

    @classmethod
    def of(cls, shape: Sequence[int], dims: DimensionNumbers) -> Layout:
        batch, red, outp = dims.axes(len(shape))
        perm = batch + red + outp
        permuted = tuple(shape[a] for a in perm)
        size = lambda axes: math.prod(shape[a] for a in axes)  # noqa: E731
        return cls(perm, permuted, size(batch), size(red), size(outp))

    def to3(self, x: jax.Array) -> jax.Array:
        """Leaf -> ``(B, m, n)``."""
        if self.perm != tuple(range(len(self.perm))):
            x = jnp.transpose(x, self.perm)
        return x.reshape(self.batch, self.m, self.n)

    def from3(self, x: jax.Array) -> jax.Array:
        """``(B, m, n)`` -> leaf shape."""
        x = x.reshape(self.permuted_shape)
        if self.perm != tuple(range(len(self.perm))):
            inv = [0] * len(self.perm)
            for i, a in enumerate(self.perm):
                inv[a] = i
            x = jnp.transpose(x, inv)
        return x


def resolve_side(m: int, n: int, proj_type: str) -> str:
    """'left' | 'right' | 'full' for a matrix with ``m`` reduction (input) and ``n`` output entries.

    The official rule on the PyTorch ``(out, in) = (n, m)`` weight: ``std`` projects the input
    dimension (``Vh[:r]``, lrx's left side of ``(m, n)``) when ``out >= in``, else the output
    dimension; ``reverse_std`` the opposite. Ties therefore go to the input axes for ``std``.
    """
    check_choice(proj_type, PROJ_TYPES, "proj_type")
    if proj_type in ("left", "right", "full"):
        return proj_type
    out_ge_in = n >= m
    if proj_type == "std":
        return "left" if out_ge_in else "right"
    return "right" if out_ge_in else "left"


class Projector(NamedTuple):
    """Orthonormal bases of one projected leaf: ``left (B, m, r)`` and/or ``right (B, n, r)``;
    the unused side is ``None``."""

    left: jax.Array | None
    right: jax.Array | None


def zero_projector(batch: int, m: int, n: int, side: str, rank: int, dtype: Any) -> Projector:
    """An all-zero :class:`Projector` of a ``(batch, m, n)`` stack for ``side`` ('left': ``(batch,
    m, rank)``, 'right': ``(batch, n, rank)``, 'full': both), the placeholder before a refresh."""
    return Projector(
        jnp.zeros((batch, m, rank), dtype) if side in ("left", "full") else None,
        jnp.zeros((batch, n, rank), dtype) if side in ("right", "full") else None)


def first_matrix(p: Projector) -> Projector:
    """The projector of the first matrix of a stack: ``(1, d, r)`` leaves -> ``(d, r)``."""
    return Projector(*(None if x is None else x[0] for x in p))


def project(g: jax.Array, p: Projector) -> jax.Array:
    """``G (B, m, n)`` -> ``R``: ``Pᵀ G (B, r, n)``, ``G Q (B, m, r)`` or ``Pᵀ G Q (B, r, r)``."""
    if p.left is not None:
        g = jnp.einsum("bmr,bmn->brn", p.left, g)
    if p.right is not None:
        g = jnp.einsum("bmn,bnr->bmr", g, p.right)
    return g


def project_back(r: jax.Array, p: Projector) -> jax.Array:
    """Low-rank ``R`` -> ``(B, m, n)``: ``P R``, ``R Qᵀ`` or ``P R Qᵀ``."""
    if p.left is not None:
        r = jnp.einsum("bmr,brn->bmn", p.left, r)
    if p.right is not None:
        r = jnp.einsum("bmr,bnr->bmn", r, p.right)
    return r


def projected_shape(batch: int, m: int, n: int, side: str, rank: int) -> tuple[int, int, int]:
    """Shape of ``R`` for a side."""
    if side == "left":
        return (batch, rank, n)
    if side == "right":
        return (batch, m, rank)
    return (batch, rank, rank)


def _cholesky_qr(y: jax.Array) -> jax.Array:
    """Basis of ``y (B, d, k)`` by one shifted Cholesky-QR pass, ``y L⁻ᵀ`` with ``L Lᵀ = yᵀy +
    s·I`` (used inside power iterations, where only the span matters). The shift keeps it finite
    for rank-deficient ``y``; ``L⁻ᵀ`` is formed on the small ``k x k`` factor and applied as a
    matmul, so a ``y`` split over ``d`` stays split (a triangular solve against ``y`` itself
    would make XLA gather it)."""
    gram = jnp.einsum("bdk,bdj->bkj", y, y)
    k = gram.shape[-1]
    eye = jnp.eye(k, dtype=gram.dtype)
    shift = 1e-6 * jnp.trace(gram, axis1=-2, axis2=-1)[:, None, None] + 1e-30
    chol = jnp.linalg.cholesky(gram + shift * eye)
    inv = jax.lax.linalg.triangular_solve(chol, jnp.broadcast_to(eye, chol.shape),
                                          left_side=True, lower=True)        # L⁻¹
    return jnp.einsum("bdk,bjk->bdj", y, inv)


def _svqb(y: jax.Array, passes: int = 2, tol: float = 1e-7) -> jax.Array:
    """Orthonormal basis of the span of ``y (B, d, k)`` by SVQB (Stathopoulos & Wu, "A block
    orthogonalization procedure with constant synchronization requirements", SIAM J. Sci.
    Comput. 23(6), 2002): ``yᵀy = V Λ Vᵀ``, ``Q = y V Λ^{-1/2}``, repeated ``passes`` times
    (the second pass restores orthogonality lost to rounding).

    Built from matmuls over ``d`` and a ``k x k`` eigh only, so when ``y`` is split over ``d``
    (a sharded gradient's rows) everything is shard-local except the ``k x k`` Gram matrix (one
    small all-reduce a pass): no all-gather, unlike Householder QR. Directions with ``λ <=
    tol·λ_max`` (numerically absent from ``y``) become zero columns instead of noise.
    """
    q = y
    for _ in range(passes):
        lam, vecs = jnp.linalg.eigh(jnp.einsum("bdk,bdj->bkj", q, q))
        keep = lam > tol * jnp.max(lam, axis=-1, keepdims=True)
        scale = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)
        q = jnp.einsum("bdk,bkj->bdj", q, vecs * scale[:, None, :])
    return q


def fix_signs(x: jax.Array) -> jax.Array:
    """Deterministic signs for basis columns ``x (B, d, r)``: each column's largest-magnitude
    entry (the first one on ties) is made positive (singular vectors are defined up to sign;
    LAPACK/XLA choices differ). Written as max / min / sum reductions over ``d`` (no gather of
    ``x`` when it is split over ``d``)."""
    mag = jnp.abs(x)
    top = jnp.max(mag, axis=-2, keepdims=True)
    iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 2)
    first = jnp.min(jnp.where(mag == top, iota, x.shape[-2]), axis=-2, keepdims=True)
    sign = jnp.sign(jnp.sum(jnp.where(iota == first, x, 0), axis=-2, keepdims=True))
    return x * jnp.where(sign == 0, 1.0, sign).astype(x.dtype)


def top_left_svd(g: jax.Array, rank: int) -> jax.Array:
    """Top-``rank`` left singular vectors ``(B, m, rank)`` of ``g (B, m, n)`` (float32 thin SVD)."""
    u, _, _ = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
    return u[..., :rank]


def _range_basis(g: jax.Array, width: int, key: jax.Array, power_iters: int,
                 seed_cols: jax.Array | None = None,
                 seed_valid: jax.Array | bool = True) -> jax.Array:
    """Orthonormal ``Q (B, m, width)`` whose span approximates the top left singular subspace of
    ``g (B, m, n)``: Halko-Martinsson-Tropp randomized range finder (arXiv 0909.4061, Alg. 4.4),
    ``Y = G Ω`` with Gaussian ``Ω (B, n, width)`` (its first columns replaced by ``seed_cols``
    when given and ``seed_valid``), ``power_iters`` subspace iterations
    ``Y ← G orth(Gᵀ orth(Y))`` (shifted Cholesky-QR, :func:`_cholesky_qr`), then the final basis
    by SVQB (:func:`_svqb`): only matmuls contracting ``m`` or ``n`` and ``width x width``
    factorizations, so a ``g`` sharded along either axis is never gathered (the official code
    has no randomized path; lrx used Householder QR for the final basis before, which XLA
    partitions by gathering ``Y``)."""
    b, m, n = g.shape
    omega = jax.random.normal(key, (b, n, width), g.dtype)
    if seed_cols is not None:
        r0 = seed_cols.shape[-1]
        seed_cols = jnp.where(seed_valid, seed_cols, omega[..., :r0])
        omega = jnp.concatenate([seed_cols, omega[..., r0:]], axis=-1)
    y = jnp.einsum("bmn,bnk->bmk", g, omega)
    for _ in range(power_iters):
        q = _cholesky_qr(y)
        z = _cholesky_qr(jnp.einsum("bmn,bmk->bnk", g, q))
        y = jnp.einsum("bmn,bnk->bmk", g, z)
    return _svqb(y)


def randomized_range(g: jax.Array, rank: int, key: jax.Array, *, oversample: int = 8,
                     power_iters: int = 1, warm: jax.Array | None = None,
                     warm_valid: jax.Array | bool = True) -> jax.Array:
    """Approximate top-``rank`` left singular subspace ``(B, m, rank)`` of ``g (B, m, n)``.

    The range finder of :func:`randomized_svd` with ``k = min(rank + oversample, m, n)`` probes
    (the first ``rank`` replaced by ``Gᵀ P_warm`` when ``warm (B, m, r)`` is given and
    ``warm_valid``), then, instead of an SVD of ``QᵀG (k x n)``, the top-``rank`` eigenvectors
    ``W`` of the small ``(QᵀG)(QᵀG)ᵀ (k x k)`` give ``P = Q W`` ordered by captured energy (only
    the left vectors are formed: a projector needs nothing else). Cost O(m n k) per iteration
    instead of O(m n min(m, n)).
    """
    g = g.astype(jnp.float32)
    b, m, n = g.shape
    k = min(rank + oversample, m, n)
    seed_cols = (None if warm is None else
                 jnp.einsum("bmn,bmr->bnr", g, warm.astype(jnp.float32)))
    q = _range_basis(g, k, key, power_iters, seed_cols, warm_valid)
    small = jnp.einsum("bmk,bmn->bkn", q, g)
    gram = jnp.einsum("bkn,bjn->bkj", small, small)
    _, vecs = jnp.linalg.eigh(gram)                     # ascending eigenvalues
    top = vecs[..., ::-1][..., :rank]
    return fix_signs(jnp.einsum("bmk,bkr->bmr", q, top))


def randomized_svd(x: jax.Array, k: int, key: jax.Array, *, oversample: int = 10,
                   power_iters: int = 2) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Top-k SVD by the Gaussian range finder with subspace (power) iterations.

    Halko, Martinsson & Tropp (arXiv 0909.4061), Alg. 4.4 (randomized subspace iteration) followed
    by Alg. 5.1 (direct SVD of ``Qᵀ A``). The one randomized SVD of lrx: GaLore's
    ``projector='randomized'`` uses its range finder (:func:`randomized_range`) and
    :func:`lrx.analysis.randomized_svd` is this function.

    Args:
      x: ``(..., m, n)`` matrix or stacked batch; computed in float32 (or wider).
      k: number of singular triplets, ``1 <= k <= min(m, n)`` (static).
      key: PRNG key for the Gaussian test matrix.
      oversample: extra columns ``p`` of the test matrix (static); ``l = min(k + p, m, n)``.
      power_iters: number of subspace iterations ``q`` (static); error decays like
        ``(sigma_{l+1} / sigma_k)^(2q+1)``.
    Returns:
      ``u (..., m, k)``, ``s (..., k)`` (descending), ``vt (..., k, n)``.
    """
    if jnp.ndim(x) < 2:
        raise ValueError(f"x must have shape (..., m, n) with at least 2 axes, got shape "
                         f"{jnp.shape(x)}")
    *lead, m, n = x.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"k must be in [1, min(m, n)] = [1, {min(m, n)}], got {k}")
    if oversample < 0 or power_iters < 0:
        raise ValueError(f"oversample and power_iters must be >= 0, got {oversample}, "
                         f"{power_iters}")
    a = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(-1, m, n)
    q = _range_basis(a, min(k + oversample, m, n), key, power_iters)
    u_small, s, vt = jnp.linalg.svd(jnp.einsum("bmk,bmn->bkn", q, a), full_matrices=False)
    u = jnp.einsum("bmk,bkj->bmj", q, u_small)
    return (u[..., :k].reshape(*lead, m, k), s[..., :k].reshape(*lead, k),
            vt[..., :k, :].reshape(*lead, k, n))


def random_orthonormal(key: jax.Array, batch: int, dim: int, rank: int) -> jax.Array:
    """``(batch, dim, rank)`` random orthonormal columns (QR of a Gaussian, sign-fixed)."""
    gauss = jax.random.normal(key, (batch, dim, rank), jnp.float32)
    q, r = jnp.linalg.qr(gauss)
    sign = jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))
    return q * jnp.where(sign == 0, 1.0, sign)[:, None, :]


def random_coordinates(key: jax.Array, batch: int, dim: int, rank: int) -> jax.Array:
    """``(batch, dim, rank)`` one-hot columns selecting ``rank`` distinct random coordinates."""
    keys = jax.random.split(key, batch)
    idx = jax.vmap(lambda k: jax.random.permutation(k, dim)[:rank])(keys)     # (batch, rank)
    return jax.nn.one_hot(idx, dim, dtype=jnp.float32, axis=1)


def compute_projector(g: jax.Array, side: str, rank: int, method: str, key: jax.Array,
                      old: Projector | None = None, *, oversample: int = 8, power_iters: int = 1,
                      warm_start: bool = False, warm_valid: jax.Array | bool = True,
                      dtype=jnp.float32) -> Projector:
    """New projector for ``g (B, m, n)``; ``method`` in svd/randomized/random/randperm."""
    b, m, n = g.shape
    k_left, k_right = jax.random.split(key)
    if method == "svd":
        g32 = g.astype(jnp.float32)
        u, _, vh = jnp.linalg.svd(g32, full_matrices=False)
        left = fix_signs(u[..., :rank]) if side in ("left", "full") else None
        right = (fix_signs(jnp.swapaxes(vh[..., :rank, :], -1, -2))
                 if side in ("right", "full") else None)
    elif method == "randomized":
        def warm(x):
            return x if (warm_start and old is not None) else None
        left = right = None
        if side in ("left", "full"):
            left = randomized_range(g, rank, k_left, oversample=oversample,
                                    power_iters=power_iters, warm=warm(old and old.left),
                                    warm_valid=warm_valid)
        if side in ("right", "full"):
            right = randomized_range(jnp.swapaxes(g, -1, -2), rank, k_right,
                                     oversample=oversample, power_iters=power_iters,
                                     warm=warm(old and old.right), warm_valid=warm_valid)
    elif method in ("random", "randperm"):
        fn = random_orthonormal if method == "random" else random_coordinates
        left = fn(k_left, b, m, rank) if side in ("left", "full") else None
        right = fn(k_right, b, n, rank) if side in ("right", "full") else None
    else:
        raise ValueError(f"projector={method!r} is not valid; choose one of "
                         "'svd', 'randomized', 'random', 'randperm'")
    cast = lambda x: None if x is None else x.astype(dtype)  # noqa: E731
    return Projector(cast(left), cast(right))


def galore_state_size(m: int, n: int, rank: int, proj_type: str = "std") -> dict[str, int]:
    """Closed-form number of optimizer-state entries of one ``m x n`` GaLore matrix (Adam).

    Returns ``{'projector': ..., 'moments': ..., 'total': ...}``; e.g. ``std``:
    ``r·min(m, n)`` projector + ``2·r·max(m, n)`` moments; ``full``: ``r(m + n) + 2r²``.
    """
    r = min(rank, m, n)
    side = resolve_side(m, n, proj_type)
    proj = {"left": m * r, "right": n * r, "full": (m + n) * r}[side]
    moments = 2 * math.prod(projected_shape(1, m, n, side, r))
    return {"projector": proj, "moments": moments, "total": proj + moments}


def tree_bytes(tree) -> int:
    """Total bytes of the array leaves of ``tree``."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)
                   if hasattr(x, "dtype")))
