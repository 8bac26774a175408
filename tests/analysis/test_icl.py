"""SPD, ILWD, implicit weights and linearity R^2 (Akyürek et al. 2023, Sec. 4.1) on hand-made
predictors with known answers."""

import numpy as np
import pytest

from lrx.analysis import icl as A


def test_spd_constant_offset():
    a = np.zeros((5, 3), np.float32)
    b = a + 2.0
    np.testing.assert_allclose(A.spd(a, b, dim=4), np.full(3, 4.0 / 4))


def test_spd_with_probes_averages_prompts_and_probes():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 4, 5)).astype(np.float32)
    b = rng.normal(size=(6, 4, 5)).astype(np.float32)
    expected = ((a.astype(np.float64) - b) ** 2).mean(axis=(0, 2)) / 3
    np.testing.assert_allclose(A.spd(a, b, 3), expected, rtol=1e-5)


def test_spd_of_linear_predictors_equals_weight_distance_over_d():
    # For x' ~ N(0, I) and linear predictors, E(w_a.x' - w_b.x')^2 = ||w_a - w_b||^2.
    rng = np.random.default_rng(1)
    d = 3
    wa, wb = rng.normal(size=(1, 1, d)), rng.normal(size=(1, 1, d))
    probes = rng.normal(size=(1, 1, 200000, d))
    pa, pb = np.einsum("bnd,bnmd->bnm", wa, probes), np.einsum("bnd,bnmd->bnm", wb, probes)
    spd = float(np.asarray(A.spd(pa.astype(np.float32), pb.astype(np.float32), d))[0])
    assert spd == pytest.approx(np.sum((wa - wb) ** 2) / d, rel=0.02)


def test_implicit_weights_recover_linear_map_and_r2():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(2, 3, 4))
    probes = rng.normal(size=(2, 3, 16, 4))
    preds = np.einsum("bnd,bnmd->bnm", w, probes)
    w_hat, r2 = A.implicit_weights(preds.astype(np.float32), probes.astype(np.float32))
    np.testing.assert_allclose(w_hat, w, atol=1e-4)
    np.testing.assert_allclose(r2, 1.0, atol=1e-5)
    np.testing.assert_allclose(A.ilwd(w_hat, w.astype(np.float32)), 0.0, atol=1e-7)


def test_r2_of_a_nonlinear_predictor_matches_numpy():
    rng = np.random.default_rng(3)
    probes = rng.normal(size=(1, 1, 50, 2))
    preds = probes[..., 0] ** 2 + 0.3 * probes[..., 1]
    _, r2 = A.implicit_weights(preds.astype(np.float32), probes.astype(np.float32))
    p, t = probes[0, 0], preds[0, 0]
    coef = np.linalg.lstsq(p, t, rcond=None)[0]
    expected = 1 - np.sum((t - p @ coef) ** 2) / np.sum((t - t.mean()) ** 2)
    assert float(np.asarray(r2)[0, 0]) == pytest.approx(expected, abs=1e-4)
    assert float(np.asarray(A.linearity_r2(preds.astype(np.float32),
                                           probes.astype(np.float32)))[0]) == pytest.approx(
        expected, abs=1e-4)


def test_ilwd_known_value():
    wa = np.zeros((2, 3, 4), np.float32)
    wb = np.ones((2, 3, 4), np.float32)
    np.testing.assert_allclose(A.ilwd(wa, wb), np.full(3, 4.0))


def test_mspd_range_and_errors():
    curve = np.array([100.0, 1.0, 2.0, 3.0, 50.0], np.float32)
    assert float(A.mspd(curve, 1, 4)) == pytest.approx(2.0)
    assert float(A.mspd(curve)) == pytest.approx(14.0)
    with pytest.raises(ValueError):
        A.mspd(curve, 3, 3)
    with pytest.raises(ValueError):
        A.spd(np.zeros((2, 3)), np.zeros((2, 4)), 1)


def test_underdetermined_mspd_is_the_mean_over_one_to_d_minus_one():
    curve = np.array([100.0, 1.0, 2.0, 3.0, 50.0])  # float64 stays float64 (NumPy in, NumPy out)
    assert A.underdetermined_mspd(curve, 4) == pytest.approx(2.0, rel=1e-15)
    assert A.underdetermined_mspd(curve, 1) == pytest.approx(1.0)   # d = 1: k = 1 alone
    assert A.underdetermined_mspd(curve, 99) == pytest.approx(14.0)  # clipped to the curve
    assert float(A.mspd(curve, 1)) == pytest.approx(np.mean(curve[1:]), rel=1e-15)


def test_cosine_against_numpy_float64():
    rng = np.random.default_rng(4)
    wa, wb = rng.normal(size=(7, 3, 5)), rng.normal(size=(7, 3, 5))
    def cos(u, v):
        return u @ v / np.sqrt((u @ u) * (v @ v))

    expected = np.mean([[cos(wa[b, k], wb[b, k]) for k in range(3)] for b in range(7)], axis=0)
    np.testing.assert_allclose(A.cosine(wa.astype(np.float32), wb.astype(np.float32)), expected,
                               rtol=1e-5)
    # parallel and antiparallel weights: +1 and -1; zero weights: 0, not NaN
    w = wa[:, :1].astype(np.float32)
    np.testing.assert_allclose(A.cosine(w, 3 * w), [1.0], rtol=1e-6)
    np.testing.assert_allclose(A.cosine(w, -w), [-1.0], rtol=1e-6)
    np.testing.assert_allclose(A.cosine(w, 0 * w), [0.0])
    with pytest.raises(ValueError, match="shapes differ"):
        A.cosine(wa, wb[:, :2])
