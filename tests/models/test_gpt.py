"""The in-context-regression GPT and the linear self-attention layer (lrx.models.gpt)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrx.data import icl
from lrx.models import gpt
from lrx.param import count_params
from lrx.train.scan import fit

D, N = 3, 5


def _model(layers=2):
    return gpt.GPT(num_layers=layers, hidden_size=32, num_heads=4, max_len=2 * N)


def _tokens(seed=0, batch=2):
    p = icl.sample(jax.random.key(seed), batch, N, D)
    return icl.interleave(p.x, p.y), p


def test_shapes_and_param_count():
    model = _model()
    tok, _ = _tokens()
    params = model.init(jax.random.key(0), tok)
    out = model.apply(params, tok)
    assert out.shape == (2, 2 * N - 1)
    assert count_params(params) > 0
    names = set(params["params"]["block_0"]["attn"])
    assert names == {"query", "key", "value", "out"}


def test_causal():
    model = _model()
    tok, _ = _tokens()
    params = model.init(jax.random.key(0), tok)
    t = 4
    changed = tok.at[:, t + 1:].set(7.0)
    a, b = model.apply(params, tok), model.apply(params, changed)
    np.testing.assert_allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)
    assert not np.allclose(a[:, t + 1:], b[:, t + 1:])


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        gpt.GPT(1, 30, 4, 8).init(jax.random.key(0), jnp.zeros((1, 3, 2)))
    with pytest.raises(ValueError, match="max_len"):
        gpt.GPT(1, 32, 4, 2).init(jax.random.key(0), jnp.zeros((1, 3, 2)))


def test_every_kernel_goes_through_lrx_param_dot(monkeypatch):
    """Each ``x @ W`` calls ``lrx.param.dot`` with the stored kernel object (so factored weights
    plug in): one call per kernel, each receiving the kernel as stored."""
    model = _model(1)
    tok, _ = _tokens()
    params = model.init(jax.random.key(0), tok)
    kernels = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if path[-1].key in ("kernel", "query", "key", "value", "projection")]
    seen = []

    def spy(x, w):
        seen.append(w)
        return jnp.matmul(x, w)

    monkeypatch.setattr(gpt, "dot", spy)
    model.apply(params, tok)
    assert len(seen) == len(kernels) == 8
    assert {id(w) for w in seen} == {id(w) for w in kernels}
    seen.clear()
    lsa = gpt.LinearSelfAttention()
    lsa.apply(gpt.gd_lsa_params(D, 1.0), jnp.zeros((2, N + 1, D + 1)))
    assert len(seen) == 4


def test_von_oswald_construction_is_one_gd_step():
    rng = np.random.default_rng(1)
    b, n, d, step = 8, 10, 4, 0.7
    x = rng.uniform(-1, 1, size=(b, n, d))
    y = np.einsum("bnd,bd->bn", x, rng.normal(size=(b, d)))
    xq = rng.uniform(-1, 1, size=(b, d))
    tokens = icl.stack_tokens(x.astype(np.float32), y.astype(np.float32), xq.astype(np.float32))
    out = gpt.LinearSelfAttention().apply(gpt.gd_lsa_params(d, step), tokens)
    # One GD step from w0 = 0 on L(w) = 1/(2n) sum (w.x - y)^2: w1 = (step/n) X^T Y.
    w1 = np.einsum("bnd,bn->bd", x, y) * step / n
    np.testing.assert_allclose(out, np.einsum("bd,bd->b", w1, xq), atol=1e-5)


def test_tiny_training_beats_zero_predictor():
    """After 400 Adam steps a 1-layer model predicts y_k from the k > 0 earlier pairs better than
    the zero predictor (whose squared error is E y^2 = d), on the same held-out prompts."""
    d, n = 2, 6
    model = gpt.GPT(num_layers=1, hidden_size=32, num_heads=2, max_len=2 * n)
    params = model.init(jax.random.key(0), jnp.zeros((1, 2 * n - 1, d + 1)))

    def batch_fn(key):
        p = icl.sample(key, 64, n, d)
        return icl.interleave(p.x, p.y), p.y

    def loss_fn(p, batch):
        tokens, y = batch
        return jnp.mean((model.apply(p, tokens)[:, ::2] - y) ** 2)

    params, _ = fit(loss_fn, params, optax.adam(1e-2), batch_fn, 400, key=jax.random.key(1),
                    log_every=400)
    p = icl.sample(jax.random.key(99), 2048, n, d)
    pred = model.apply(params, icl.interleave(p.x, p.y))[:, ::2]
    model_loss = float(jnp.mean((pred[:, 1:] - p.y[:, 1:]) ** 2))
    zero_loss = float(jnp.mean(p.y[:, 1:] ** 2))
    assert model_loss < 0.95 * zero_loss
