"""lrx.optim: memory-efficient low-rank optimizers as optax gradient transformations.

* :func:`galore` / :func:`scale_by_galore` — GaLore (arXiv 2403.03507);
* :func:`frugal` / :func:`scale_by_frugal` — FRUGAL (arXiv 2411.07837);
* :func:`fira` / :func:`scale_by_fira` — Fira (arXiv 2410.01623);
* :func:`apollo` / :func:`apollo_mini` / :func:`scale_by_apollo` — APOLLO (arXiv 2412.05270);
* :func:`adamw_8bit` / :func:`scale_by_adam_8bit` — 8-bit Adam(W) with block-wise dynamic
  quantization (arXiv 2110.02861); :mod:`lrx.optim.quant` also has ``store``/``load`` for
  float32 / bfloat16 / 8-bit moments;
* :func:`projectors` — the current projection matrices of any optimizer state;
* :class:`Strategy` / :mod:`lrx.optim.engine` — the shared engine; one strategy file per method;
* :func:`tree_bytes` — bytes of a pytree's arrays (one implementation, in ``subspace.py``);
* :func:`path_mask` / :func:`path_labels` — projection masks / multi_transform labels from
  parameter paths; :class:`DimensionNumbers` — layouts other than "last two axes".
"""

from lrx.optim.apollo import (
    SCALE_TYPES,
    ScaleByApolloState,
    SeededProjection,
    apollo,
    apollo_mini,
    scale_by_apollo,
)
from lrx.optim.engine import (
    STATIC_ARGS,
    Plan,
    Strategy,
    inject_hyperparams,
    learning_rate_then_decay,
)
from lrx.optim.fira import RESIDUALS, ScaleByFiraState, fira, scale_by_fira
from lrx.optim.frugal import (
    BLOCK_ORDERS,
    MODULE_ORDER,
    STATE_FREE,
    SUBSPACES,
    ScaleByFrugalState,
    frugal,
    model_order_key,
    scale_by_frugal,
)
from lrx.optim.galore import MOMENTS, ScaleByGaloreState, galore, scale_by_galore
from lrx.optim.introspect import projectors
from lrx.optim.masks import ATTN_MLP, path_labels, path_mask, path_name, path_names
from lrx.optim.quant import (
    MOMENT_DTYPES,
    QuantizedArray,
    ScaleByAdam8bitState,
    adamw_8bit,
    scale_by_adam_8bit,
)
from lrx.optim.subspace import (
    PROJ_TYPES,
    PROJECTORS,
    DimensionNumbers,
    Projector,
    galore_state_size,
    randomized_range,
    resolve_side,
    top_left_svd,
    tree_bytes,
)

# Before the engine split every low-rank method shared one state class; its old name now denotes
# GaLore's state (Fira and FRUGAL have their own: ScaleByFiraState, ScaleByFrugalState).
LowRankState = ScaleByGaloreState

__all__ = [
    "MOMENT_DTYPES", "QuantizedArray", "ScaleByAdam8bitState", "adamw_8bit",
    "scale_by_adam_8bit",
    "MODULE_ORDER", "SCALE_TYPES", "ScaleByApolloState", "SeededProjection", "apollo",
    "apollo_mini", "model_order_key", "projectors", "scale_by_apollo",
    "ATTN_MLP", "BLOCK_ORDERS", "MOMENTS", "PROJECTORS", "PROJ_TYPES", "RESIDUALS", "STATE_FREE",
    "SUBSPACES", "DimensionNumbers", "LowRankState", "Projector", "ScaleByFiraState",
    "ScaleByFrugalState", "ScaleByGaloreState", "fira", "frugal", "galore", "galore_state_size",
    "STATIC_ARGS", "inject_hyperparams", "learning_rate_then_decay", "path_labels", "path_mask",
    "path_name", "path_names",
    "randomized_range", "resolve_side", "scale_by_fira", "scale_by_frugal", "scale_by_galore",
    "top_left_svd", "tree_bytes", "Plan", "Strategy",
]
