"""Reference predictors of lrx.linear.regression against NumPy float64 re-derivations, closed forms
and scikit-learn (Akyürek et al. 2023, Sec. 4.3)."""

import jax
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsRegressor

from lrx.linear import regression as R


def _prompt(n=7, d=4, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.1 * rng.normal(size=n)
    return x, y


def test_least_squares_is_min_norm_pinv_at_every_prefix():
    x, y = _prompt()
    w = np.asarray(R.prefix_weights(R.least_squares, x.astype(np.float32), y.astype(np.float32)))
    for k in range(x.shape[0]):
        expected = np.linalg.pinv(x[:k]) @ y[:k] if k else np.zeros(x.shape[1])
        np.testing.assert_allclose(w[k], expected, atol=2e-4, err_msg=f"k={k}")


@pytest.mark.parametrize("lam", [0.1, 0.5, 2.0])
def test_ridge_matches_normal_equations(lam):
    x, y = _prompt(seed=1)
    w = np.asarray(R.prefix_weights(R.ridge, x.astype(np.float32), y.astype(np.float32), lam))
    for k in range(x.shape[0]):
        xk, yk = x[:k], y[:k]
        expected = np.linalg.solve(xk.T @ xk + lam * np.eye(x.shape[1]), xk.T @ yk)
        np.testing.assert_allclose(w[k], expected, atol=1e-4, err_msg=f"k={k}")


def test_ridge_tends_to_min_norm_least_squares():
    x, y = _prompt(seed=2)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    for k in (2, 3, 6):  # under-, and over-determined (d = 4)
        w = np.asarray(R.ridge(x32, y32, k, 1e-6))
        np.testing.assert_allclose(w, np.linalg.pinv(x[:k]) @ y[:k], atol=1e-3)


def test_ridge_per_prefix_lambda_array():
    x, y = _prompt(seed=3)
    lams = np.linspace(0.1, 1.0, x.shape[0])
    w = np.asarray(R.prefix_weights(R.ridge, x.astype(np.float32), y.astype(np.float32), lams))
    k = 5
    expected = np.linalg.solve(x[:k].T @ x[:k] + lams[k] * np.eye(4), x[:k].T @ y[:k])
    np.testing.assert_allclose(w[k], expected, atol=1e-4)


def test_bayes_lambda():
    assert R.bayes_lambda(0.5, 1.0) == pytest.approx(0.25)
    assert R.bayes_lambda(0.5, 0.75) == pytest.approx(4 / 9)
    with pytest.raises(ValueError):
        R.bayes_lambda(0.5, 0.0)


@pytest.mark.parametrize("num_steps", [1, 3])
def test_gradient_descent_against_numpy(num_steps):
    x, y = _prompt(seed=4)
    step = 0.02
    w = np.asarray(R.prefix_weights(R.gradient_descent, x.astype(np.float32),
                                    y.astype(np.float32), step, num_steps=num_steps))
    for k in range(x.shape[0]):
        v = np.zeros(x.shape[1])
        for _ in range(num_steps):
            v = v - step * 2 * x[:k].T @ (x[:k] @ v - y[:k])
        np.testing.assert_allclose(w[k], v, atol=1e-5)
    # one step from zero is 2 * alpha * X^T Y
    k = 5
    one = np.asarray(R.gradient_descent(x.astype(np.float32), y.astype(np.float32), k, step))
    np.testing.assert_allclose(one, 2 * step * x[:k].T @ y[:k], atol=1e-5)


def test_sgd_one_pass_against_numpy():
    x, y = _prompt(seed=5)
    step = 0.03
    w = np.asarray(R.prefix_weights(R.sgd, x.astype(np.float32), y.astype(np.float32), step))
    v = np.zeros(x.shape[1])
    for k in range(x.shape[0]):
        np.testing.assert_allclose(w[k], v, atol=1e-5, err_msg=f"k={k}")
        v = v - 2 * step * x[k] * (x[k] @ v - y[k])


def test_averaging():
    x, y = _prompt(seed=6)
    w = np.asarray(R.prefix_weights(R.averaging, x.astype(np.float32), y.astype(np.float32)))
    np.testing.assert_allclose(w[0], 0.0)
    for k in range(1, x.shape[0]):
        np.testing.assert_allclose(w[k], (y[:k, None] * x[:k]).mean(0), atol=1e-5)


@pytest.mark.parametrize("weighting", ["uniform", "distance"])
def test_knn_against_sklearn(weighting):
    x, y = _prompt(n=9, d=3, seed=7)
    rng = np.random.default_rng(8)
    queries = rng.normal(size=(9, 5, 3))
    pred = np.asarray(R.prefix_knn(x.astype(np.float32), y.astype(np.float32),
                                   queries.astype(np.float32), 3, weighting))
    np.testing.assert_allclose(pred[0], 0.0)
    for k in range(1, 9):
        ref = KNeighborsRegressor(n_neighbors=min(3, k), weights=weighting).fit(x[:k], y[:k])
        np.testing.assert_allclose(pred[k], ref.predict(queries[k]), atol=1e-4, err_msg=f"k={k}")


def test_knn_distance_exact_match_and_bad_weighting():
    x = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], np.float32)
    y = np.array([1.0, 2.0, 3.0], np.float32)
    out = np.asarray(R.knn(x, y, 3, np.array([[1.0, 0.0]], np.float32), 3, "distance"))
    np.testing.assert_allclose(out, [2.0])
    with pytest.raises(ValueError, match="weighting"):
        R.knn(x, y, 3, x, 3, "gaussian")


def test_predict_shapes():
    w = np.ones((2, 3), np.float32)
    q = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(R.predict(w, q), [3.0, 12.0])
    assert R.predict(w, np.ones((2, 4, 3), np.float32)).shape == (2, 4)


def test_tune_step_one_step_gd_matches_closed_form():
    # For w = 2 a X^T Y, the error sum_b (y'_b - 2 a s_b)^2 with s_b = x'_b^T X_b^T Y_b is
    # quadratic in a with minimiser a* = sum y' s / (2 sum s^2): the grid picks its nearest point.
    rng = np.random.default_rng(9)
    b, n, d = 256, 6, 3
    xs = rng.normal(size=(b, n, d))
    ys = np.einsum("bnd,bd->bn", xs, rng.normal(size=(b, d)))
    grid = np.linspace(0.005, 0.3, 60)
    best = np.asarray(R.tune_step(R.gradient_descent, xs.astype(np.float32),
                                  ys.astype(np.float32), grid))
    for k in range(1, n):
        s = np.einsum("bd,bid,bi->b", xs[:, k], xs[:, :k], ys[:, :k])
        a_star = np.sum(ys[:, k] * s) / (2 * np.sum(s**2))
        assert best[k] == pytest.approx(grid[np.argmin(np.abs(grid - a_star))], abs=1e-6)
    single = np.asarray(R.tune_step(R.gradient_descent, xs.astype(np.float32),
                                    ys.astype(np.float32), grid, per_prefix=False))
    assert np.all(single == single[0]) and single[0] in grid.astype(np.float32)


def test_vmap_over_prompts():
    rng = np.random.default_rng(10)
    xs = rng.normal(size=(3, 5, 2)).astype(np.float32)
    ys = rng.normal(size=(3, 5)).astype(np.float32)
    w = jax.vmap(lambda x, y: R.prefix_weights(R.ridge, x, y, 0.5))(xs, ys)
    assert w.shape == (3, 5, 2)
