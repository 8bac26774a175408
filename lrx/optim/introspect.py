"""Reading an optimizer state: :func:`projectors` finds the lrx low-rank states inside any optax
wrapper (``optax.chain`` tuples, ``inject_hyperparams``, ``multi_transform``/``masked``) and
returns their current projection matrices."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lrx.optim import subspace as sub
from lrx.optim.apollo import ScaleByApolloState, SeededProjection
from lrx.optim.engine import is_variable, leaf_value
from lrx.optim.fira import ScaleByFiraState
from lrx.optim.frugal import ScaleByFrugalState
from lrx.optim.galore import ScaleByGaloreState

# States whose ``projector`` field holds a pytree of Projector (None for unprojected leaves).
PROJECTED_STATES = (ScaleByGaloreState, ScaleByFiraState, ScaleByFrugalState)


def _is_node(x) -> bool:
    return x is None or isinstance(x, (sub.Projector, SeededProjection, optax.MaskedNode))


def _found(state: Any) -> list:
    """Per-leaf projector trees of every lrx state nested in ``state``."""
    if isinstance(state, PROJECTED_STATES):
        return [state.projector]
    if isinstance(state, ScaleByApolloState):
        return [state.projection]
    out = []
    if isinstance(state, tuple) or isinstance(state, list):
        for x in state:
            out += _found(x)
    elif isinstance(state, dict):
        for x in state.values():
            out += _found(x)
    elif hasattr(state, "inner_state"):
        out += _found(state.inner_state)
    elif hasattr(state, "inner_states"):
        out += _found(state.inner_states)
    return out


def projectors(opt_state: Any) -> Any:
    """The current projection matrices of an optimizer state, as a pytree like the params.

    Each projected leaf gives a :class:`lrx.optim.Projector` ``(left (B, m, r) | None,
    right (B, n, r) | None)`` in the leaf's ``(B, m, n)`` view (APOLLO's seeded Gaussian is
    regenerated from its key); unprojected leaves give ``None``. Works through ``optax.chain``,
    ``inject_hyperparams``/``lrx.optim.inject_hyperparams`` and ``multi_transform`` (the trees of
    several lrx transforms are merged leaf by leaf) and ``nnx.Optimizer(...).opt_state``. Raises
    ValueError if none is found.
    """
    # nnx.Optimizer keeps its state as nnx Variables: read their values.
    opt_state = jax.tree_util.tree_map(leaf_value, opt_state, is_leaf=is_variable)
    trees = _found(opt_state)
    if not trees:
        raise ValueError("no lrx.optim low-rank state found in opt_state")

    def leaf(*xs):
        for x in xs:
            if isinstance(x, SeededProjection):
                return x.projector()
            if isinstance(x, sub.Projector):
                return x
        return None

    return jax.tree_util.tree_map(leaf, *trees, is_leaf=_is_node)
