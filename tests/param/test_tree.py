"""lrx.param.tree: rules over paths (apply), partition/combine, parameter counts, factory by
name, ReLoRA's merge_and_reinit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrx.param as P
from tests.param._common import FACTORIES, M, N, f64, perturb


def test_partition_combine_round_trip(w):
    params = {"a": {"kernel": FACTORIES["sltrain"]()(jax.random.key(0), w)},
              "b": {"kernel": FACTORIES["lora"]()(jax.random.key(1), w)},
              "c": {"scale": jnp.ones((4,))}}
    t, fz = P.partition(params)
    assert t["b"]["kernel"].base is None and fz["b"]["kernel"].a is None
    # the SLTrain support is static (regenerated from its seed), present in both parts
    np.testing.assert_array_equal(fz["a"]["kernel"].indices, params["a"]["kernel"].indices)
    assert jax.tree.leaves(fz["a"]["kernel"]) == [] and t["a"]["kernel"].values is not None
    back = P.combine(t, fz)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert np.shape(x) == np.shape(y) and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    # optimizer state exists only for what trains
    import optax

    state = optax.adam(1e-3).init(t)
    n_state = sum(x.size for x in jax.tree.leaves(state[0].mu))
    assert n_state == P.count(params)["trainable"]


def test_counts_closed_forms():
    m, n = 48, 80
    w = jnp.zeros((m, n))
    k = jax.random.key(0)
    r = 8
    c = P.count({"x": P.lora(r)(k, w)})
    assert c["trainable"] == r * (m + n) and c["frozen"] == m * n
    assert P.count({"x": P.lowrank(r)(k, w)}) == dict(
        trainable=r * (m + n), frozen=0, trainable_bytes=4 * r * (m + n), frozen_bytes=0,
        generated=0)
    assert P.count({"x": P.dora(r)(k, w)})["trainable"] == r * (m + n) + n
    assert P.count({"x": P.vera(r)(k, w)})["trainable"] == r + n
    for rank in (5, 8, 48, 64):   # N = ceil(min/r): 10, 6, 1, 1
        num = math.ceil(min(m, n) / rank)
        assert P.count({"x": P.randlora(rank)(k, w)})["trainable"] == num * (rank + min(m, n))
    for delta in (0.03, 0.1, 0.5):
        cs = P.count({"x": P.sltrain(r, density=delta)(k, w)})
        assert cs["trainable"] == r * (m + n) + int(delta * m * n)
        assert cs["frozen"] == 0
        assert cs["generated"] == int(delta * m * n)       # the support, regenerated from a seed
    assert P.count({"x": P.nola(r, 30, 20)(k, w)})["trainable"] == 50
    # peft's published count (reference note 1.1): LoRA r=32 on q (3072x3072) and v (3072->1024)
    # of 28 layers = 9,175,040; the closed form, evaluated without building the matrices:
    assert 28 * (32 * (3072 + 3072) + 32 * (3072 + 1024)) == 9_175_040


def test_apply_rules_and_warnings():
    params = {"layers_0": {"attn": {"q": {"kernel": jnp.ones((8, 8))}},
                           "norm": {"weight": jnp.ones((8,))}},
              "embed": jnp.ones((10, 8))}
    with pytest.warns(UserWarning, match=r"matches no parameter.*layers_0/attn/q/kernel"):
        out = P.apply(params, [(r".*/q/kernel", P.lora(2)), (r"nothing", P.lora(2))],
                      jax.random.key(0))
    assert isinstance(out["layers_0"]["attn"]["q"]["kernel"], P.LoRA)
    assert not P.is_node(out["embed"])
    # fullmatch semantics: a substring does not match
    with pytest.warns(UserWarning):
        P.apply(params, [("attn", P.lora(2))], jax.random.key(0))
    # first matching rule wins; already-factored nodes are left alone
    with pytest.warns(UserWarning, match=r"'\.\*kernel' matches no parameter"):
        out2 = P.apply(out, [(r".*kernel", P.lowrank(2)), (r"embed", P.lowrank(2))],
                       jax.random.key(0))
    assert isinstance(out2["layers_0"]["attn"]["q"]["kernel"], P.LoRA)
    assert isinstance(out2["embed"], P.LowRank)
    # per-path keys: two identical matrices get different adapters
    two = P.apply({"p": jnp.ones((8, 8)), "q": jnp.ones((8, 8))}, [(".*", P.lora(2))],
                  jax.random.key(0))
    assert not np.allclose(np.asarray(two["p"].a), np.asarray(two["q"].a))


def test_factory_by_name():
    f = P.factory("lora", rank=4, alpha=8.0)
    assert f(jax.random.key(0), jnp.ones((8, 8))).scale == 2.0
    with pytest.raises(ValueError, match="valid methods: lowrank, lora, dora, sltrain"):
        P.factory("loraa", rank=4)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) density; valid: rank, alpha"):
        P.factory("lora", rank=4, density=0.1)
    with pytest.raises(ValueError, match=r"missing argument\(s\) rank"):
        P.factory("sltrain")
    assert set(P.METHODS) == set(P.nodes.FACTORIES) | set(P.methods.FACTORIES_V2)


def test_merge_and_reinit(w):
    for init in ("default", "pissa"):
        params = {"k": perturb(P.lora(3, alpha=6, init=init)(jax.random.key(0), w)),
                  "d": jnp.ones(3)}
        before = f64(P.materialize(params)["k"])
        after = jax.jit(P.merge_and_reinit)(params, jax.random.key(5))
        np.testing.assert_allclose(f64(P.materialize(after)["k"]), before, atol=1e-5)
        k = after["k"]
        if init == "default":
            np.testing.assert_allclose(f64(k.base), before, atol=1e-6)
            assert np.all(np.asarray(k.b) == 0)
            assert np.all(np.abs(np.asarray(k.a)) <= 1 / math.sqrt(M))
        else:
            u, s, vt = np.linalg.svd(before, full_matrices=False)
            np.testing.assert_allclose(k.scale * f64(k.a) @ f64(k.b),
                                       (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
        assert not np.allclose(np.asarray(k.a), np.asarray(params["k"].a))


def test_count_params_counts_every_stored_scalar(w):
    tree = {"a": jnp.zeros((3, 5)), "b": [jnp.zeros(7, jnp.bfloat16), np.zeros((2, 2, 2))],
            "s": jax.ShapeDtypeStruct((4, 6), jnp.float32), "none": None, "name": "x"}
    assert P.count_params(tree) == 15 + 7 + 8 + 24
    assert P.count_params({}) == 0
    # a factored node counts the arrays it stores (LoRA: base + a + b), as count() does
    node = P.lora(4, alpha=8)(jax.random.key(0), w)
    assert P.count_params({"k": node}) == M * N + M * 4 + 4 * N
    counts = P.count({"k": node})
    assert P.count_params({"k": node}) == counts["trainable"] + counts["frozen"]
