"""lrx.optim.masks: path masks, labels, and masks/dimension_numbers as the engine reads them."""

import jax
import jax.numpy as jnp

import lrx.optim as lo


def test_mask_pytree_callable_and_dimension_numbers():
    params = {"attn": {"q": {"kernel": jnp.zeros((8, 3, 4))}}, "embed": jnp.zeros((10, 8)),
              "norm": jnp.zeros((8,))}
    mask = lo.path_mask(params, r".*attn/.*kernel")
    assert mask == {"attn": {"q": {"kernel": True}}, "embed": False, "norm": False}
    dims = {"attn": {"q": {"kernel": lo.DimensionNumbers(reduction=(0,), output=(1, 2))}},
            "embed": None, "norm": None}
    state = lo.scale_by_galore(3, mask=mask, dimension_numbers=dims).init(params)
    assert state.projector["embed"] is None and state.mu["embed"].shape == (10, 8)
    # (8, 3*4) matrix, std on wide -> left projector (1, 8, 3), moments (1, 3, 8)
    assert state.projector["attn"]["q"]["kernel"].left.shape == (1, 8, 3)
    # callable mask gives the same plan
    state2 = lo.scale_by_galore(3, mask=lambda p: lo.path_mask(p, r".*attn/.*kernel"),
                                dimension_numbers=dims).init(params)
    assert jax.tree_util.tree_structure(state2) == jax.tree_util.tree_structure(state)
    labels = lo.path_labels(params, {"lowrank": r".*attn/.*"}, "adam")
    assert labels == {"attn": {"q": {"kernel": "lowrank"}}, "embed": "adam", "norm": "adam"}
