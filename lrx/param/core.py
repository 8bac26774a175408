"""Core of lrx.param: the :class:`Factored` base class of every factored weight and ``dot(x, w)``.

A factored weight stands in for a dense kernel ``W`` of shape ``(m, n)`` in Flax's ``(in, out)``
layout (``y = x @ W``). Each concrete node is a frozen dataclass registered as a JAX pytree whose
fields have one of four *kinds*:

- ``trainable``: array leaves that receive gradients and optimizer state;
- ``frozen``: array leaves that never train (a frozen base weight, sparse support indices);
- ``static``: hashable Python metadata kept in the treedef (scale, rank, seeds of random bases,
  the dense shape), so regenerated random bases are compile-time constants under ``jit``;
- ``witness``: an optional zero-byte ``float0`` array of shape ``(m, n)``, placed first among the
  leaves of nodes that have no dense ``(m, n)`` leaf (``LowRank``, ``SparsePlusLowRank``). Flax
  linen's ``self.param`` compares the shape of the *first* leaf of a stored parameter with the
  shape its initializer would produce; the witness lets those nodes pass that check. It carries
  no data, is dropped by :func:`lrx.param.partition` and recreated by :func:`lrx.param.combine`.
  (Consequence: take gradients with respect to ``partition(params)[0]``, not the combined tree,
  whose witness leaves are not differentiable.)
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

TRAINABLE, FROZEN, STATIC, WITNESS = "trainable", "frozen", "static", "witness"


def trainable() -> Any:
    """Dataclass field marker: an array leaf that trains."""
    return dataclasses.field(metadata={"kind": TRAINABLE})


def frozen() -> Any:
    """Dataclass field marker: an array leaf that never trains (excluded from gradients)."""
    return dataclasses.field(metadata={"kind": FROZEN})


def static(default: Any = dataclasses.MISSING) -> Any:
    """Dataclass field marker: hashable metadata stored in the treedef."""
    return dataclasses.field(default=default, metadata={"kind": STATIC})


def witness() -> Any:
    """Dataclass field marker: the zero-byte ``float0`` shape witness (see module docstring)."""
    return dataclasses.field(default=None, metadata={"kind": WITNESS})


def make_witness(shape: tuple[int, ...]) -> np.ndarray:
    """A ``float0`` NumPy array of ``shape``: zero bytes, ``np.shape(...) == shape``."""
    return np.zeros(tuple(shape), dtype=jax.dtypes.float0)


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

    Leaves are ordered witness first, then the fields in declaration order.
    """
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    kinds = {f.name: f.metadata.get("kind", STATIC) for f in dataclasses.fields(cls)}
    cls.kinds = kinds
    data = [n for n, k in kinds.items() if k == WITNESS]
    data += [n for n, k in kinds.items() if k in (TRAINABLE, FROZEN)]
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
