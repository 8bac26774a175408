"""Selecting which leaves are projected: masks and labels from parameter paths.

GaLore's recipe (arXiv 2403.03507, ``torchrun_main.py``) projects only the attention and MLP
matrices; embeddings, LM head and norms get the same Adam unprojected. With Flax parameter trees
the leaves have paths like ``layers_0/attn/q/kernel``; :func:`path_mask` turns a regex into the
boolean pytree that ``lrx.optim.galore(mask=...)`` takes, :func:`path_labels` builds labels for
``optax.multi_transform``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

from lrx.paths import ATTN_MLP, path_str  # noqa: F401 - ATTN_MLP: the selection of GaLore's recipe

path_name = path_str  # the name lrx.optim has always exported


def _is_variable(x: Any) -> bool:
    try:
        from flax import nnx
    except ImportError:          # pragma: no cover - flax is a dependency
        return False
    return isinstance(x, nnx.Variable)


def _name(path) -> str:
    """The '/'-joined path; nnx paths lose their trailing ``/value`` (a Variable's field)."""
    name = path_name(path)
    return name[: -len("/value")] if name.endswith("/value") else name


def path_names(tree: Any) -> Any:
    """Pytree of the leaves' '/'-joined path names (handy to write regexes). nnx Variables
    (``nnx.Param`` ...) count as leaves, so an nnx state gives ``'l1/kernel'``."""
    return jax.tree_util.tree_map_with_path(lambda p, _: _name(p), tree, is_leaf=_is_variable)


def path_mask(params: Any, include: str = ".*", exclude: str | None = None, *,
              min_ndim: int = 2) -> Any:
    """Boolean pytree: True where the leaf path fully matches ``include``, does not match
    ``exclude`` (``re.search``) and the leaf has at least ``min_ndim`` axes.

    Example: ``path_mask(params, ATTN_MLP)`` projects the attention and MLP kernels only.
    Works on Flax linen dicts and on nnx states (``nnx.state(model, nnx.Param)``): an nnx
    Variable is one leaf named by its module path (``'l1/kernel'``, no ``/value``).
    """
    inc = re.compile(include)
    exc = re.compile(exclude) if exclude else None

    def leaf(path, x):
        name = _name(path)
        ok = inc.fullmatch(name) is not None and (exc is None or exc.search(name) is None)
        return bool(ok and getattr(x, "ndim", 0) >= min_ndim)

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_variable)


def path_labels(params: Any, rules: Mapping[str, str], default: str) -> Any:
    """Pytree of labels for ``optax.multi_transform``: the first ``label: regex`` rule whose regex
    fully matches the leaf path, else ``default``."""
    compiled = [(label, re.compile(rx)) for label, rx in rules.items()]

    def leaf(path, _):
        name = _name(path)
        for label, rx in compiled:
            if rx.fullmatch(name):
                return label
        return default

    return jax.tree_util.tree_map_with_path(leaf, params, is_leaf=_is_variable)
