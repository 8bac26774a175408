"""LLaMA decoder: causality, RoPE relative-position property, RMSNorm and SwiGLU against NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrx.models import llama
from lrx.param import count_params

SMALL = llama.LlamaConfig(hidden_size=32, intermediate_size=48, num_heads=4, num_layers=2,
                          vocab_size=64, max_len=32)


def _params(cfg, T=12, seed=0):
    # jitted: one compile instead of op-by-op dispatch (the slow part on CPU)
    init = jax.jit(llama.Llama(cfg).init)
    return init(jax.random.key(seed), jnp.zeros((1, T), jnp.int32))["params"]


@pytest.mark.parametrize("scan", [False, True])
def test_causal_changing_future_token_leaves_past_logits(scan):
    cfg = llama.LlamaConfig(**{**SMALL.__dict__, "scan_layers": scan})
    params = _params(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, size=(2, 12)).astype(np.int32)
    t = 6
    changed = tokens.copy()
    changed[:, t + 1] = (changed[:, t + 1] + 7) % 64
    apply = jax.jit(llama.Llama(cfg).apply)
    a = apply({"params": params}, tokens)
    b = apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert np.abs(np.asarray(a[:, t + 1:]) - np.asarray(b[:, t + 1:])).max() > 1e-4


def test_rope_scores_depend_only_on_relative_position():
    head_dim, T = 16, 20
    rng = np.random.default_rng(1)
    q = rng.normal(size=(head_dim,)).astype(np.float32)
    k = rng.normal(size=(head_dim,)).astype(np.float32)
    cos, sin = llama.rope_angles(jnp.arange(T), head_dim, 10000.0)
    # the same q at every position, the same k at every position
    qs = llama.apply_rope(jnp.broadcast_to(q, (1, T, 1, head_dim)), cos, sin)[0, :, 0]
    ks = llama.apply_rope(jnp.broadcast_to(k, (1, T, 1, head_dim)), cos, sin)[0, :, 0]
    scores = np.asarray(qs @ ks.T, np.float64)
    for offset in (0, 1, 3, 7):
        diag = np.diagonal(scores, offset=offset)
        np.testing.assert_allclose(diag, diag[0], rtol=1e-4, atol=1e-4)
    # and the rotation preserves norms (it is orthogonal)
    np.testing.assert_allclose(np.linalg.norm(qs, axis=-1), np.linalg.norm(q), rtol=1e-5)


def test_rope_matches_numpy_rotation_of_pairs():
    head_dim, T = 8, 5
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, T, 2, head_dim))
    cos, sin = llama.rope_angles(jnp.arange(T), head_dim, 10000.0)
    got = np.asarray(llama.apply_rope(jnp.asarray(x, jnp.float32), cos, sin))
    half = head_dim // 2
    ref = np.empty_like(x)
    for p in range(T):
        for i in range(half):
            theta = p * 10000.0 ** (-2 * i / head_dim)
            a, b = x[0, p, :, i], x[0, p, :, i + half]
            ref[0, p, :, i] = a * np.cos(theta) - b * np.sin(theta)
            ref[0, p, :, i + half] = b * np.cos(theta) + a * np.sin(theta)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_against_numpy():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 7)) * 5
    w = rng.normal(size=(7,))
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * w
    got = llama.rms_norm(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), 1e-6)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_swiglu_mlp_against_numpy():
    cfg = SMALL
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, cfg.hidden_size))
    mlp = llama.MLP(cfg)
    params = mlp.init(jax.random.key(0), jnp.zeros((1, 1, cfg.hidden_size)))["params"]
    g, u, d = (np.asarray(params[n]["kernel"], np.float64) for n in ("gate", "up", "down"))
    silu = lambda z: z / (1 + np.exp(-z))
    ref = (silu(x @ g) * (x @ u)) @ d
    got = mlp.apply({"params": params}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_presets_match_galore_configs_parameter_counts():
    # GaLore's LLaMA configs: (hidden, intermediate, heads, layers), vocab 32000, untied head.
    for name, (h, i, layers) in {"llama_60m": (512, 1376, 8), "llama_130m": (768, 2048, 12),
                                 "llama_350m": (1024, 2736, 24),
                                 "llama_1b": (2048, 5461, 24),
                                 "llama_7b": (4096, 11008, 32)}.items():
        cfg = llama.PRESETS[name]
        expected = 2 * 32000 * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h
        shapes = jax.eval_shape(lambda c=cfg: llama.Llama(c).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
        assert count_params(shapes) == expected


def test_bad_config_messages():
    with pytest.raises(ValueError, match="unknown model preset 'llama_13b'.*tiny.*llama_7b"):
        llama.preset("llama_13b")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        llama.LlamaConfig(hidden_size=30, intermediate_size=8, num_heads=4, num_layers=1)
    cfg = SMALL
    params = _params(cfg)
    with pytest.raises(ValueError, match="exceeds the model's max_len"):
        llama.Llama(cfg).apply({"params": params}, jnp.zeros((1, 40), jnp.int32))


def test_factored_kernels_without_witness_and_whole_tree_gradient():
    """LowRank / SLTrain nodes (no dense (m, n) leaf) load through Linear's read_kernel, give the
    dense model's logits, and jax.grad w.r.t. the whole tree of nodes works."""
    import lrx.param as P

    cfg = llama.preset("tiny", hidden_size=16, intermediate_size=24, num_heads=2, num_layers=1,
                 vocab_size=11, max_len=8)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 11)
    model = llama.Llama(cfg)
    params = jax.jit(model.init)(jax.random.key(1), tokens)["params"]
    fparams = P.apply(params, [(r".*/attn/.*/kernel", P.lowrank(4)),
                               (r".*/mlp/.*/kernel", P.sltrain(4, density=0.2))],
                      jax.random.key(2))
    assert isinstance(fparams["layers_0"]["attn"]["q"]["kernel"], P.LowRank)
    apply = jax.jit(model.apply)
    logits = apply({"params": fparams}, tokens)
    dense = apply({"params": P.materialize(fparams)}, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(dense), rtol=1e-4, atol=1e-5)
    loss = lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2)  # noqa: E731
    g = jax.jit(jax.grad(loss))(fparams)
    assert jax.tree.structure(g) == jax.tree.structure(fparams)
    gq = g["layers_0"]["attn"]["q"]["kernel"]
    assert gq.u.shape == (16, 4) and np.all(np.isfinite(np.asarray(gq.u)))


def _unstack(stack, num_layers):
    return {f"layers_{i}": jax.tree_util.tree_map(lambda a, i=i: a[i], stack)
            for i in range(num_layers)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scanned_remat_stack_matches_unrolled_layers(dtype):
    # scan_layers + remat runs remat_stack (a custom-VJP loop); its loss and gradients must be
    # those of the unrolled model (a Python loop of Blocks) with the same weights.
    base = {**SMALL.__dict__, "num_layers": 3, "dtype": dtype, "param_dtype": dtype}
    scanned = llama.LlamaConfig(**{**base, "scan_layers": True, "remat": True})
    unrolled = llama.LlamaConfig(**base)
    params = _params(scanned)
    assert params["layers"]["mlp"]["up"]["kernel"].shape == (3, 32, 48)
    flat = {k: v for k, v in params.items() if k != "layers"}
    flat.update(_unstack(params["layers"], 3))
    tokens = np.random.default_rng(2).integers(0, 64, size=(2, 9)).astype(np.int32)

    def loss(cfg):
        def f(p):
            logits = llama.Llama(cfg).apply({"params": p}, tokens[:, :-1])
            logp = jax.nn.log_softmax(logits)
            return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()
        return jax.jit(jax.value_and_grad(f))

    l_s, g_s = loss(scanned)(params)
    l_u, g_u = loss(unrolled)(flat)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(float(l_s), float(l_u), rtol=tol)
    g_s = {**{k: v for k, v in g_s.items() if k != "layers"}, **_unstack(g_s["layers"], 3)}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_s),
                            jax.tree_util.tree_leaves(g_u), strict=True):
        assert a.dtype == jnp.dtype(dtype), path
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * np.abs(b).max(), err_msg=str(path))
