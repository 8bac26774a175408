"""Parameter paths: the one way lrx names a pytree leaf (``'layers_0/attn/q/kernel'``), shared by
masks (lrx.optim), parameterization rules (lrx.param) and diagnostics (lrx.analysis)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# GaLore's recipe (arXiv 2403.03507) for lrx's LLaMA (`lrx.models.llama`): the attention and MLP
# kernels. The one such regex of lrx (lrx.optim.ATTN_MLP, the studies' defaults).
ATTN_MLP = r".*(attn|mlp)/[^/]+/kernel"


def path_str(path: Sequence[Any]) -> str:
    """``'a/b/c'`` for a JAX key path (dict keys, attribute names, sequence indices)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
        else:
            parts.append(str(entry))
    return "/".join(parts)
