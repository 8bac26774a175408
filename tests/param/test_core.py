"""lrx.param.core: dot on dense and factored weights, read_kernel inside flax modules."""

from __future__ import annotations

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrx.param as P
from tests.param._common import FACTORIES, M, N, perturb


class DenseLike(nn.Module):
    """A linen Dense without bias that reads its kernel with lrx.param.read_kernel and calls
    lrx.param.dot."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = P.read_kernel(self, "kernel", nn.initializers.normal(0.02),
                               (x.shape[-1], self.features), jnp.float32)
        return P.dot(x, kernel)


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return DenseLike(N, name="out")(nn.relu(DenseLike(M, name="hidden")(x)))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_nodes_pass_through_flax_linen_apply(name):
    model = TwoLayer()
    x = jax.random.normal(jax.random.key(0), (2, 3, M))
    params = model.init(jax.random.key(1), x)["params"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fparams = P.apply(params, [(r"(hidden|out)/kernel", FACTORIES[name]())],
                          jax.random.key(2))
    fparams = jax.tree.map(lambda n: perturb(n) if P.is_node(n) else n, fparams,
                           is_leaf=P.is_node)
    y = jax.jit(model.apply)({"params": fparams}, x)
    y_dense = model.apply({"params": P.materialize(fparams)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_dense), rtol=1e-4, atol=1e-6)
    t, fz = P.partition(fparams)
    g = jax.jit(jax.grad(lambda t: jnp.sum(model.apply({"params": P.combine(t, fz)}, x) ** 2)))(t)
    assert jax.tree.structure(g) == jax.tree.structure(t)
    # without a shape witness, the gradient w.r.t. the whole tree of nodes works too and agrees
    # with the partitioned one on the trainable fields
    g_full = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(fparams)
    assert jax.tree.structure(g_full) == jax.tree.structure(fparams)
    g_train, _ = P.partition(g_full)
    for a, b in zip(jax.tree.leaves(g_train), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_dot_dense_arrays_unchanged():
    x = np.ones((2, 3), np.float32)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(np.asarray(P.dot(x, w)), x @ w)          # NumPy weight
    np.testing.assert_allclose(np.asarray(P.dot(jnp.asarray(x), jnp.asarray(w))), x @ w)
    assert P.dot(jnp.ones((2, 3), jnp.bfloat16), jnp.asarray(w)).dtype == jnp.bfloat16


def test_read_kernel_checks_the_dense_shape_of_a_stored_node():
    x = jnp.ones((2, M))
    params = TwoLayer().init(jax.random.key(1), x)["params"]
    wrong = P.apply(params, [("hidden/kernel", P.lowrank(2))], jax.random.key(0))
    wrong["hidden"]["kernel"] = P.lowrank(2)(jax.random.key(0), jnp.ones((M + 1, M)))
    with pytest.raises(ValueError, match=r"dense shape \(13, 12\), the module expects \(12, 12\)"):
        TwoLayer().apply({"params": wrong}, x)
