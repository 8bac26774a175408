"""Core of lrx.param: the :class:`Factored` base class of every factored weight and ``dot(x, w)``.

A factored weight stands in for a dense kernel ``W`` of shape ``(m, n)`` in Flax's ``(in, out)``
layout (``y = x @ W``). Each concrete node is a frozen dataclass registered as a JAX pytree whose
fields have one of three *kinds*:

- ``trainable``: array leaves that receive gradients and optimizer state;
- ``frozen``: array leaves that never train (a frozen base weight, sparse support indices);
- ``static``: hashable Python metadata kept in the treedef (scale, rank, seeds of random bases,
  the dense shape, the seed of a sparse support), so regenerated random bases and supports are
  compile-time constants under ``jit``.

Every array leaf of a node is floating point, so ``jax.grad`` of a loss with respect to a whole
tree of nodes works (frozen fields then get gradients too, which are simply not used);
:func:`lrx.param.partition` is the way to leave frozen fields out of the gradient computation and
of the optimizer state. Models read a stored node with :func:`read_kernel` (the ``has_variable`` /
``get_variable`` pattern plus a check of the node's dense ``shape``) instead of linen's
``self.param``, whose shape check looks at the first leaf of the stored value only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

TRAINABLE, FROZEN, STATIC = "trainable", "frozen", "static"


def trainable() -> Any:
    """Dataclass field marker: an array leaf that trains."""
    return dataclasses.field(metadata={"kind": TRAINABLE})


def frozen() -> Any:
    """Dataclass field marker: an array leaf that never trains (excluded from gradients)."""
    return dataclasses.field(metadata={"kind": FROZEN})


def static(default: Any = dataclasses.MISSING) -> Any:
    """Dataclass field marker: hashable metadata stored in the treedef."""
    return dataclasses.field(default=default, metadata={"kind": STATIC})


class Factored:
    """Base class of factored weights. Subclasses are created with :func:`register_node`.

    Every subclass has a static ``shape: tuple[int, int]`` (the dense ``(m, n)``) and implements
    ``materialize() -> (m, n)`` and ``dot(x: (..., m)) -> (..., n)``.
    """

    kinds: ClassVar[dict[str, str]] = {}
    shape: tuple[int, int]

    @classmethod
    def fields_of_kind(cls, kind: str) -> tuple[str, ...]:
        return tuple(name for name, k in cls.kinds.items() if k == kind)

    @property
    def ndim(self) -> int:
        return 2

    @property
    def dtype(self) -> Any:
        leaves = [getattr(self, f) for f in self.fields_of_kind(TRAINABLE)
                  + self.fields_of_kind(FROZEN)]
        leaves = [x for x in leaves if x is not None and jnp.issubdtype(x.dtype, jnp.floating)]
        return leaves[0].dtype if leaves else jnp.float32

    def replace(self, **changes: Any) -> Factored:
        return dataclasses.replace(self, **changes)

    def materialize(self) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def dot(self, x: jax.Array) -> jax.Array:
        """``x @ W`` for ``x: (..., m)``; the default materialises ``W``."""
        return jnp.matmul(x, self.materialize().astype(x.dtype))

    def generated_size(self) -> int:
        """Number of random-basis entries regenerated from seeds (not stored); 0 by default."""
        return 0


def register_node(cls: type) -> type:
    """Class decorator: frozen dataclass + pytree registration from the field kinds.

    Leaves are the trainable and frozen fields in declaration order.
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    kinds = {f.name: f.metadata.get("kind", STATIC) for f in dataclasses.fields(cls)}
    cls.kinds = kinds
    data = [n for n, k in kinds.items() if k in (TRAINABLE, FROZEN)]
    meta = [n for n, k in kinds.items() if k == STATIC]
    jax.tree_util.register_dataclass(cls, data_fields=data, meta_fields=meta)
    return cls


def is_node(x: Any) -> bool:
    """True for a factored weight node."""
    return isinstance(x, Factored)


def dot(x: jax.Array, w: Any) -> jax.Array:
    """``x @ W`` over the last axis of ``x``.

    Args:
      x: ``(..., m)`` activations.
      w: a dense ``(m, n)`` array (Flax ``(in, out)`` layout; jax or NumPy) or a factored weight
        node (:class:`Factored`), computed by the node without building ``W`` where the method
        allows it.
    Returns:
      ``(..., n)``, in the dtype of ``x``.
    """
    if isinstance(w, Factored):
        return w.dot(x)
    return jnp.matmul(x, jnp.asarray(w, x.dtype))


def read_kernel(module: Any, name: str, init: Any, shape: tuple[int, int], dtype: Any) -> Any:
    """The kernel ``name`` of a flax linen ``module``: a stored factored node as it is, else
    ``module.param(name, init, shape, dtype)`` (dense: created at init, shape-checked at apply).

    Linen's ``self.param`` checks only the first leaf of a stored value against the initializer's
    shape, which a factored node (e.g. ``LowRank``'s ``u: (m, r)``) fails; a node is instead
    checked here through its dense ``shape``.

    Args:
      module: the calling ``nn.Module`` (inside ``@nn.compact`` or ``setup``).
      name: variable name in the ``'params'`` collection.
      init: initializer ``(key, shape, dtype) -> (m, n)`` used when the variable does not exist.
      shape: the dense ``(m, n)`` (in, out) shape the module expects.
      dtype: parameter dtype of a freshly created dense kernel.
    Returns:
      a dense ``(m, n)`` array or a :class:`Factored` node with ``node.shape == shape``.
    Raises:
      ValueError: a stored node whose dense shape differs from ``shape``.
    """
    if module.has_variable("params", name):
        stored = module.get_variable("params", name)
        if isinstance(stored, Factored):
            if tuple(stored.shape) != tuple(shape):
                raise ValueError(f"{module.name}/{name}: stored {type(stored).__name__} has dense "
                                 f"shape {tuple(stored.shape)}, the module expects "
                                 f"{tuple(shape)}")
            return stored
    return module.param(name, init, shape, dtype)
