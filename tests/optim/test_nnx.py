"""Every lrx.optim transform under flax.nnx: nnx.Optimizer(model, tx, wrt=nnx.Param) inside
nnx.jit gives the same parameters as the transform on the equivalent plain dict of arrays; path
masks understand nnx paths; projectors() reads the optimizer state through the wrappers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lrx.optim as lo


class Small(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.Linear(8, 8, rngs=rngs)      # square: the tie case
        self.mlp = nnx.Linear(8, 12, rngs=rngs)
        self.head = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.mlp(jnp.tanh(self.attn(x)))))


def _mask(p):
    return lo.path_mask(p, r"(attn|mlp)/kernel")


TRANSFORMS = {
    "galore": lambda: lo.galore(0.01, rank=2, update_proj_gap=2, mask=_mask),
    "galore_stagger": lambda: lo.galore(0.01, rank=2, update_proj_gap=2, mask=_mask,
                                        stagger=True, moments="reset"),
    "fira": lambda: lo.fira(0.01, rank=2, update_proj_gap=2, mask=_mask),
    "frugal": lambda: lo.frugal(0.01, update_proj_gap=2, mask=_mask),
    "frugal_blocks": lambda: lo.frugal(0.01, update_proj_gap=2, subspace="blocks", mask=_mask),
    "apollo": lambda: lo.apollo(0.01, rank=2, update_proj_gap=2, mask=_mask),
    "apollo_mini": lambda: lo.apollo_mini(0.01, update_proj_gap=2, mask=_mask),
}


def _loss(model, x):
    return jnp.mean(model(x) ** 2)


@nnx.jit
def _nnx_step(model, opt, x):
    grads = nnx.grad(_loss)(model, x)
    opt.update(model, grads)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_nnx_optimizer_matches_plain_pytree(name):
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8))
    model = Small(nnx.Rngs(0))
    graphdef, params0 = nnx.split(model, nnx.Param)
    plain = jax.tree_util.tree_map(lambda v: v, nnx.to_pure_dict(params0))
    opt = nnx.Optimizer(model, TRANSFORMS[name](), wrt=nnx.Param)
    for _ in range(3):
        _nnx_step(model, opt, x)
    proj = lo.projectors(opt.opt_state)
    if name != "frugal_blocks":                       # blocks have no projector
        assert isinstance(proj["attn"]["kernel"], lo.Projector)
    assert proj["head"]["kernel"] is None

    tx = TRANSFORMS[name]()

    def plain_loss(p):
        params = jax.tree_util.tree_map(lambda v: v, params0)       # a copy to fill
        nnx.replace_by_pure_dict(params, p)
        return _loss(nnx.merge(graphdef, params), x)

    state = tx.init(plain)
    for _ in range(3):
        g = jax.grad(plain_loss)(plain)
        u, state = jax.jit(tx.update)(g, state, plain)
        plain = optax.apply_updates(plain, u)
    got = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(plain),
                    strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_path_mask_on_nnx_state():
    params = nnx.state(Small(nnx.Rngs(0)), nnx.Param)
    names = jax.tree_util.tree_leaves(lo.path_names(params))
    assert "attn/kernel" in names and not any(n.endswith("/value") for n in names)
    mask = lo.path_mask(params, r"(attn|mlp)/kernel")
    flat = {n: m for n, m in zip(names, jax.tree_util.tree_leaves(mask), strict=True)}
    assert flat == {"attn/bias": False, "attn/kernel": True, "head/bias": False,
                    "head/kernel": False, "mlp/bias": False, "mlp/kernel": True}
