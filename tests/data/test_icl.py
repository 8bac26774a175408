"""Prompt sampler and token layouts of lrx.data.icl (Akyürek et al.; von Oswald et al.)."""

import jax
import numpy as np
import pytest

from lrx.data import icl


def test_sample_shapes_and_noiseless_labels():
    p = icl.sample(jax.random.key(0), 3, 5, 4)
    assert p.x.shape == (3, 5, 4) and p.y.shape == (3, 5) and p.w.shape == (3, 4)
    x, y, w = (np.asarray(a, np.float64) for a in p)
    np.testing.assert_allclose(y, np.einsum("bnd,bd->bn", x, w), rtol=1e-5, atol=1e-5)


def test_sample_is_seeded_and_fresh():
    a = icl.sample(jax.random.key(1), 2, 3, 2)
    b = icl.sample(jax.random.key(1), 2, 3, 2)
    c = icl.sample(jax.random.key(2), 2, 3, 2)
    np.testing.assert_array_equal(a.x, b.x)
    assert not np.allclose(a.x, c.x)


def test_sample_moments_noise_and_prior():
    sigma, tau = 0.5, 2.0
    p = icl.sample(jax.random.key(3), 4000, 4, 3, noise_std=sigma, weight_std=tau)
    x, y, w = (np.asarray(a, np.float64) for a in p)
    assert abs(x.var() - 1.0) < 0.05
    assert abs(w.std() - tau) < 0.05 * tau
    resid = y - np.einsum("bnd,bd->bn", x, w)
    assert abs(resid.std() - sigma) < 0.03


@pytest.mark.parametrize("kwargs", [dict(noise_std=-1.0), dict(weight_std=0.0)])
def test_sample_rejects_bad_scales(kwargs):
    with pytest.raises(ValueError):
        icl.sample(jax.random.key(0), 2, 3, 2, **kwargs)


def test_interleave_layout():
    x = np.arange(6, dtype=np.float32).reshape(1, 3, 2) + 1  # x_1=(1,2), x_2=(3,4), x_3=(5,6)
    y = np.array([[10.0, 20.0, 30.0]], np.float32)
    tok = np.asarray(icl.interleave(x, y))
    expected = np.array([[0, 1, 2], [10, 0, 0], [0, 3, 4], [20, 0, 0], [0, 5, 6]], np.float32)
    np.testing.assert_array_equal(tok[0], expected)
    np.testing.assert_array_equal(np.asarray(icl.x_positions(3)), [0, 2, 4])


def test_interleave_rejects_mismatch():
    with pytest.raises(ValueError):
        icl.interleave(np.zeros((2, 3, 4), np.float32), np.zeros((2, 4), np.float32))


def test_stack_tokens_layout():
    x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    y = np.array([5.0, 6.0], np.float32)
    tok = np.asarray(icl.stack_tokens(x, y, np.array([7.0, 8.0], np.float32)))
    np.testing.assert_array_equal(tok, [[1, 2, 5], [3, 4, 6], [7, 8, 0]])


@pytest.mark.parametrize("layout", icl.LAYOUTS)
def test_place_probes_sets_only_the_query_token(layout):
    rng = np.random.default_rng(5)
    b, n, d, m = 2, 3, 4, 5
    x = rng.normal(size=(b, n, d)).astype(np.float32)
    y = rng.normal(size=(b, n)).astype(np.float32)
    if layout == "interleave":
        tokens, position = np.asarray(icl.interleave(x, y)), 2 * (n - 1)
    else:
        tokens, position = np.asarray(icl.stack_tokens(x[:, :-1], y[:, :-1], x[:, -1])), n - 1
    probes = rng.normal(size=(b, m, d)).astype(np.float32)
    out = np.asarray(icl.place_probes(tokens, probes, position, layout))
    assert out.shape == (b, m) + tokens.shape[1:]
    for i in range(b):
        for j in range(m):
            expected = tokens[i].copy()
            expected[position] = (np.r_[0.0, probes[i, j]] if layout == "interleave"
                                  else np.r_[probes[i, j], 0.0])
            np.testing.assert_allclose(out[i, j], expected, rtol=1e-6)


def test_place_probes_rejects_bad_input():
    tokens = np.zeros((2, 5, 4), np.float32)
    with pytest.raises(ValueError, match="choose one of"):
        icl.place_probes(tokens, np.zeros((2, 1, 3)), 0, "random")
    with pytest.raises(ValueError, match="do not fit"):
        icl.place_probes(tokens, np.zeros((2, 1, 4)), 0, "stack")
    with pytest.raises(ValueError, match="outside"):
        icl.place_probes(tokens, np.zeros((2, 1, 3)), 5, "stack")
