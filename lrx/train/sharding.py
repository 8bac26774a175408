"""Device mesh and sharding rules: data parallelism over ``data`` and FSDP-style parameter and
optimizer-state sharding over ``fsdp``.

The mesh has two axes, ``('data', 'fsdp')``. The batch is split over both axes (every device sees a
different slice of the batch); each parameter and optimizer-state leaf is split along its largest
axis divisible by the ``fsdp`` size (replicated when no axis divides), so memory per device shrinks
with ``fsdp`` while XLA inserts the all-gathers and reduce-scatters. The bases of an
:class:`lrx.optim.Projector` in the optimizer state are split along the gradient axis they span,
else along the rank (:func:`basis_spec`), and the low-rank moments follow their gradient's split
(:func:`projected_spec`). The same code runs on one CPU, many fake CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), a GPU or a TPU slice.

FSDP without gathering: the low-rank optimizers learn the shardings from the jit's in/out
shardings by XLA's sharding propagation (no option, no mesh inside :mod:`lrx.optim`, so the same
transform runs under plain ``jit`` on one device). With ``projector='randomized'`` the refresh is
written only with matmuls that contract a gradient axis, elementwise ops, reductions and
``k x k`` factorizations (:func:`lrx.optim.subspace.randomized_range`), which XLA partitions
along either axis without all-gathering the gradient; the exact SVD (the official default) stays
correct under FSDP but gathers each projected gradient (measured in ``bench_memory``).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = 0, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (default: all). ``data=0`` means "all devices not
    used by fsdp". Raises ValueError when ``data * fsdp`` differs from the device count."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp <= 0:
        raise ValueError(f"mesh.fsdp must be >= 1, got {fsdp}")
    if data < 0:
        raise ValueError(f"mesh.data must be >= 0 (0 = all remaining devices), got {data}")
    if data == 0:
        if n % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} available devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but "
                         f"{n} are available ({devices[0].platform}); set mesh.data=0 to use all")
    return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp), AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_elements: int = 1024) -> PartitionSpec:
    """PartitionSpec that splits the largest axis divisible by ``fsdp_size`` over ``'fsdp'``.

    Leaves with fewer than ``min_elements`` scalars (norm weights, scalars, counters) stay
    replicated. Ties go to the last axis.
    """
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_elements:
        return PartitionSpec()
    best = None
    for axis, dim in enumerate(shape):
        if dim % fsdp_size == 0 and (best is None or dim >= shape[best]):
            best = axis
    if best is None:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[best] = "fsdp"
    return PartitionSpec(*spec)


def basis_spec(shape: tuple[int, ...], fsdp_size: int, min_elements: int = 1024
               ) -> PartitionSpec:
    """PartitionSpec of a projector basis ``(..., d, r)`` (:class:`lrx.optim.Projector`): split
    along ``d`` (the gradient axis it spans) when ``fsdp_size`` divides it, else along ``r``
    when that divides, else replicated.

    Why not :func:`fsdp_spec`: a basis is used against its gradient, ``Pᵀ G`` and ``P N``. When
    the gradient is split along ``d``, a basis split the same way keeps the back-projection local
    and makes the projection one small all-reduce. When ``d`` is indivisible (llama_1b's
    intermediate 5461 on 8 devices) every device needs the whole basis of the matrix it works
    on: split along ``r`` it is stored ``1/fsdp`` per device and all-gathered one matrix at a
    time inside the per-matrix update loop (:func:`lrx.optim.engine.map_matrices`), which moves
    the basis once per step (``d·r`` per matrix, the size of the replicated copy) and saves
    ``(1 - 1/fsdp)`` of it on every device. Measured (llama_1b, 8 devices, bf16 bases, README
    "Memory at paper scale"): replicated 2.05 GiB per device, split along ``r`` 1.65 GiB (1.63
    vs 1.25 GiB after the direction change of the update loop); the whole-stack gathers that an
    ``r`` split cost before the per-matrix loop are gone. The price is communication: each step
    gathers the bases one matrix at a time (on XLA:CPU in float32 and once for the projection,
    once for the back-projection: +1.5 GiB per device and step at llama_1b).
    """
    if fsdp_size <= 1 or len(shape) < 2 or int(np.prod(shape, dtype=np.int64)) < min_elements:
        return PartitionSpec()
    for axis in (-2, -1):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return PartitionSpec(*spec)
    return PartitionSpec()


def projected_spec(shape: tuple[int, ...], projector: Any, fsdp_size: int,
                   min_elements: int = 1024) -> PartitionSpec:
    """PartitionSpec of an array shaped like the projected gradient ``R`` of a one-sided
    :class:`lrx.optim.Projector` (bases as arrays or ShapeDtypeStructs): a low-rank moment
    ``(B, r, n)`` of a left basis ``P (B, m, r)``, or ``(B, m, r)`` of a right basis
    ``Q (B, n, r)``, whose gradient ``(B, m, n)`` is split by :func:`fsdp_spec` (the harness'
    rule for a parameter stored as ``(B, m, n)``).

    The moment follows its gradient: the gradient axis it keeps (``B``, ``n`` of a left basis,
    ``m`` of a right one) is split where the gradient is; when the gradient is split along the
    projected axis (``m`` of a left basis, ``n`` of a right one), the rank axis ``r`` is split,
    so ``R = Pᵀ G`` / ``G Q`` ends in a reduce of one matrix's ``R`` and the back-projection
    gathers one matrix's ``N``. :func:`fsdp_spec` would split the largest axis instead: ``m`` of
    the ``(24, 2048, 512)`` moments of llama_1b's attention kernels, whose gradients are split
    along ``n``. Measured (llama_1b, 8 devices): while the update's direction buffer started as
    zeros, XLA moved every attention-gradient stack to ``m`` before the update (a float32
    all-to-all of the whole stack) and this rule took the step from 1.65 to 1.52 GiB per
    device; since :func:`lrx.optim.engine.update_per_matrix` starts the direction from the
    gradient, XLA keeps the gradient's layout either way (1.25 GiB with or without the rule, the
    same collectives), so the rule now only makes that layout explicit instead of leaving it to
    sharding propagation. Anything else (a two-sided projector, other shapes, no split) falls
    back to :func:`fsdp_spec`.
    """
    left, right = projector
    fallback = fsdp_spec(shape, fsdp_size, min_elements)
    if (left is None) == (right is None) or len(shape) != 3 or fallback == PartitionSpec():
        return fallback
    basis = tuple(np.shape(right if left is None else left))
    if len(basis) != 3 or basis[0] != shape[0] or basis[2] != shape[1 if left is not None
                                                                     else 2]:
        return fallback
    if left is not None:         # R (B, r, n) = Pᵀ G: keeps B and n, contracts m
        b, r, n = shape
        m = basis[1]
        kept, rank_axis, projected = {0: 0, 2: 2}, 1, 1
    else:                        # R (B, m, r) = G Q: keeps B and m, contracts n
        b, m, r = shape
        n = basis[1]
        kept, rank_axis, projected = {0: 0, 1: 1}, 2, 2
    grad = fsdp_spec((b, m, n), fsdp_size, min_elements)
    split = [axis for axis, name in enumerate(grad) if name is not None]
    spec = [None] * 3
    if split and split[0] in kept:
        spec[kept[split[0]]] = "fsdp"
    elif split and split[0] == projected and r % fsdp_size == 0:
        spec[rank_axis] = "fsdp"
    else:
        return fallback
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array leaf of ``tree`` (arrays or ShapeDtypeStructs): the FSDP
    rule of :func:`fsdp_spec`, except in an optimizer state with a ``projector`` field (GaLore,
    Fira, FRUGAL): the bases of a :class:`lrx.optim.Projector` follow :func:`basis_spec`, and
    the arrays of the state's other per-leaf fields that have the projected gradient's shape
    (the low-rank moments) follow :func:`projected_spec`."""
    from lrx.optim.subspace import Projector

    fsdp_size = mesh.shape["fsdp"]
    is_projector = lambda x: isinstance(x, Projector)  # noqa: E731
    named = lambda spec: NamedSharding(mesh, spec)  # noqa: E731

    def plain(x):
        return named(fsdp_spec(tuple(np.shape(x)), fsdp_size))

    def bases(p):
        return Projector(*(None if b is None else named(basis_spec(tuple(np.shape(b)),
                                                                   fsdp_size)) for b in p))

    def state(node):
        projectors = node.projector
        out = {}
        for field in node._fields:
            value = getattr(node, field)
            if field == "projector":
                out[field] = jax.tree_util.tree_map(
                    lambda p: bases(p) if is_projector(p) else shard(p), value,
                    is_leaf=is_projector)
                continue
            try:
                out[field] = jax.tree_util.tree_map(
                    lambda p, x: (jax.tree_util.tree_map(
                        lambda a: named(projected_spec(tuple(np.shape(a)), p, fsdp_size)), x)
                        if is_projector(p) else shard(x)),
                    projectors, value, is_leaf=lambda x: x is None or is_projector(x))
            except (ValueError, TypeError):        # not a per-leaf field like the projectors
                out[field] = shard(value)
        return type(node)(**out)

    def is_state(x):
        return (isinstance(x, tuple) and hasattr(x, "_fields") and "projector" in x._fields
                and not is_projector(x))

    def shard(t):
        return jax.tree_util.tree_map(
            lambda x: state(x) if is_state(x) else bases(x) if is_projector(x) else plain(x),
            t, is_leaf=lambda x: is_state(x) or is_projector(x))

    return shard(tree)


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
    """Sharding of an ``ndim`` batch array split over all mesh axes along ``batch_axis``."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, PartitionSpec(*spec))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (``data * fsdp``)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def put_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global batch (the same host array on every process) placed with ``sharding``; works on
    one host and on many (each process supplies its addressable shards)."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
