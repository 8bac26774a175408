"""lrx.optim: memory-efficient low-rank optimizers as optax gradient transformations.

* :func:`galore` / :func:`scale_by_galore` — GaLore (arXiv 2403.03507);
* :func:`frugal` / :func:`scale_by_frugal` — FRUGAL (arXiv 2411.07837);
* :func:`fira` / :func:`scale_by_fira` — Fira (arXiv 2410.01623);
* :func:`apollo` / :func:`apollo_mini` / :func:`scale_by_apollo` — APOLLO (arXiv 2412.05270);
* :func:`adamw_8bit` / :func:`scale_by_adam_8bit` — 8-bit Adam(W) with block-wise dynamic
  quantization (arXiv 2110.02861); :mod:`lrx.optim.quant` also has ``store``/``load`` for
  float32 / bfloat16 / 8-bit moments;
* :func:`projectors` — the current projection matrices of any optimizer state;
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
from lrx.optim.fira import ScaleByFiraState, fira, scale_by_fira
from lrx.optim.frugal import ScaleByFrugalState, frugal, scale_by_frugal
from lrx.optim.galore import ScaleByGaloreState, galore, scale_by_galore
from lrx.optim.introspect import projectors
from lrx.optim.lowrank import (
    BLOCK_ORDERS,
    MODULE_ORDER,
    MOMENTS,
    RESIDUALS,
    STATE_FREE,
    STATIC_ARGS,
    SUBSPACES,
    LowRankState,
    inject_hyperparams,
    learning_rate_then_decay,
    model_order_key,
)
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
    "top_left_svd", "tree_bytes",
]
