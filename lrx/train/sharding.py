"""Device mesh and sharding rules: data parallelism over ``data`` and FSDP-style parameter and
optimizer-state sharding over ``fsdp``.

The mesh has two axes, ``('data', 'fsdp')``. The batch is split over both axes (every device sees a
different slice of the batch); each parameter and optimizer-state leaf is split along its largest
axis divisible by the ``fsdp`` size (replicated when no axis divides), so memory per device shrinks
with ``fsdp`` while XLA inserts the all-gathers and reduce-scatters. The bases of an
:class:`lrx.optim.Projector` in the optimizer state are split along the gradient axis they span
or replicated (:func:`basis_spec`). The same code runs on one CPU, many fake CPU devices
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
    along ``d`` (the gradient axis it spans) when ``fsdp_size`` divides it, else replicated.

    Why not :func:`fsdp_spec`: a basis is used against its gradient, ``Pᵀ G`` and ``P N``. When
    the gradient is split along ``d``, a basis split the same way keeps the back-projection local
    and makes the projection one small all-reduce; when it is not (``d`` indivisible, e.g.
    llama_1b's intermediate 5461), a basis split along ``r`` (what ``fsdp_spec`` picks) has to
    be all-gathered, upcast and all, on every step, whereas a replicated one makes both products
    local. Measured (llama_1b, 8 devices, README "Memory at paper scale").
    """
    if fsdp_size <= 1 or len(shape) < 2 or int(np.prod(shape, dtype=np.int64)) < min_elements:
        return PartitionSpec()
    if shape[-2] % fsdp_size:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[-2] = "fsdp"
    return PartitionSpec(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for every array leaf of ``tree`` (arrays or ShapeDtypeStructs): the FSDP
    rule of :func:`fsdp_spec`, except the bases of a :class:`lrx.optim.Projector` in an optimizer
    state, which follow :func:`basis_spec`."""
    from lrx.optim.subspace import Projector

    fsdp_size = mesh.shape["fsdp"]

    def node(x):
        if isinstance(x, Projector):
            return Projector(*(None if b is None else
                               NamedSharding(mesh, basis_spec(tuple(np.shape(b)), fsdp_size))
                               for b in x))
        return NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp_size))

    return jax.tree_util.tree_map(node, tree, is_leaf=lambda x: isinstance(x, Projector))


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
