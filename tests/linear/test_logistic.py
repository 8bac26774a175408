"""lrx.linear.logistic against NumPy float64 re-derivations of Tyurin (arXiv 2412.08424): the loss
and gradient, LR+GD / Normalized LR+GD iterates, Thm 3.2's limit, Thm 4.1's two-point example and
the worst-case rows of Table 1."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrx.data import separable
from lrx.linear import logistic


def np_sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def np_gd(features, labels, gamma, steps, normalized=False):
    """Plain NumPy float64 LR+GD from 0, written from the paper's formulas."""
    z = labels[:, None] * features
    theta = np.zeros(features.shape[1])
    out = [theta.copy()]
    for _ in range(steps):
        s = np_sigmoid(-(z @ theta))
        grad = -(s[:, None] * z).mean(axis=0)
        beta = 1.0 / s.mean() if normalized else 1.0
        theta = theta - gamma * beta * grad
        out.append(theta.copy())
    return np.array(out)


def np_batch_perceptron(features, labels, steps):
    z = labels[:, None] * features
    n = len(labels)
    theta = np.zeros(features.shape[1])
    out = [theta.copy()]
    for t in range(steps):
        wrong = (z @ theta) <= 0
        theta = theta + z[wrong].sum(axis=0) / n * (0.5 if t == 0 else 1.0)
        out.append(theta.copy())
    return np.array(out)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.standard_normal((40, 5)), np.where(rng.standard_normal(40) > 0, 1.0, -1.0)


def test_loss_and_gradient_against_numpy(data):
    features, labels = data
    theta = np.random.default_rng(1).standard_normal(5)
    with jax.enable_x64(True):
        got_loss = logistic.loss(jnp.asarray(theta), jnp.asarray(features), jnp.asarray(labels))
        got_grad = logistic.gradient(jnp.asarray(theta), jnp.asarray(features), jnp.asarray(labels))
        auto = jax.grad(logistic.loss)(jnp.asarray(theta), jnp.asarray(features),
                                       jnp.asarray(labels))
    m = labels * (features @ theta)
    want_loss = np.mean(np.log1p(np.exp(-m)))
    want_grad = -np.mean((np_sigmoid(-m) * labels)[:, None] * features, axis=0)
    assert float(got_loss) == pytest.approx(want_loss, rel=1e-13)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(auto, want_grad, rtol=1e-12, atol=1e-15)
    # Central finite differences of the NumPy loss.
    eps = 1e-6
    fd = [(np.mean(np.log1p(np.exp(-labels * (features @ (theta + eps * e)))))
           - np.mean(np.log1p(np.exp(-labels * (features @ (theta - eps * e)))))) / (2 * eps)
          for e in np.eye(5)]
    np.testing.assert_allclose(got_grad, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("rule", ["constant", "normalized", "risk_adaptive"])
def test_directions_against_numpy(data, rule):
    features, labels = data
    theta = 0.3 * np.random.default_rng(2).standard_normal(5)
    m = labels * (features @ theta)
    grad = -np.mean((np_sigmoid(-m) * labels)[:, None] * features, axis=0)
    want = {"constant": grad, "normalized": grad / np.mean(np_sigmoid(-m)),
            "risk_adaptive": grad / np.mean(np.log1p(np.exp(-m)))}[rule]
    with jax.enable_x64(True):
        got = logistic.direction(jnp.asarray(theta), jnp.asarray(features), jnp.asarray(labels),
                                 rule)
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-14)


def test_normalized_direction_is_finite_when_sigmoids_underflow():
    ds = separable.worst_case(20)
    with jax.enable_x64(True):
        theta = jnp.asarray([1e4, 0.0])  # every margin is 5e3: sigma(-m) underflows to 0
        d = logistic.direction(theta, jnp.asarray(ds.features), jnp.asarray(ds.labels),
                               "normalized")
        r = logistic.direction(theta, jnp.asarray(ds.features), jnp.asarray(ds.labels),
                               "risk_adaptive")
    # All margins are equal, so the weights are uniform: -mean_i z_i.
    z = ds.labels[:, None] * ds.features
    np.testing.assert_allclose(d, -z.mean(axis=0), rtol=1e-12)
    assert np.all(np.isfinite(np.asarray(r)))


@pytest.mark.parametrize("rule", ["constant", "normalized"])
def test_sweep_matches_numpy_gd(data, rule):
    features, labels = data
    gammas = np.array([0.1, 3.0, 50.0])
    with jax.enable_x64(True):
        trace = logistic.sweep(features, labels, gammas, 25, rule=rule)
    for g, gamma in enumerate(gammas):
        want = np_gd(features, labels, gamma, 25, normalized=(rule == "normalized"))
        np.testing.assert_allclose(trace.params[g], want, rtol=1e-10, atol=1e-12)
        m = labels[None] * (want @ features.T)
        np.testing.assert_allclose(trace.loss[g], np.mean(np.logaddexp(0, -m), axis=1),
                                   rtol=1e-10)
        np.testing.assert_allclose(trace.accuracy[g], np.mean(m > 0, axis=1))
    assert trace.params.shape == (3, 26, 5) and trace.loss.shape == (3, 26)


def test_float32_default_and_run_equals_sweep(data):
    features, labels = data
    trace = logistic.run(features.astype(np.float32), labels, 0.5, 10)
    assert trace.params.dtype == jnp.float32
    swept = logistic.sweep(features.astype(np.float32), labels, [0.5], 10)
    np.testing.assert_allclose(trace.params, swept.params[0], rtol=1e-6)


def test_thm_3_2_limit_and_first_step_half():
    """theta_t / gamma -> Batch Perceptron iterates (first step 1/(2n) sum z_i) as gamma grows."""
    ds = separable.planted(200, 6, mu=0.02, spread=0.05, seed=1)
    gammas = np.array([1e2, 1e4, 1e6, 1e8])
    with jax.enable_x64(True):
        trace = logistic.sweep(ds.features, ds.labels, gammas, 60)
    reference = np_batch_perceptron(ds.features, ds.labels, 60)
    z = ds.labels[:, None] * ds.features
    np.testing.assert_allclose(reference[1], z.sum(axis=0) / (2 * len(z)))
    np.testing.assert_allclose(np.asarray(trace.params[:, 1]) / gammas[:, None],
                               np.tile(reference[1], (len(gammas), 1)), rtol=1e-13)
    dist = logistic.scaled_distance(trace.params, gammas, reference)
    assert np.all(np.diff(dist) <= 0), dist
    assert dist[-1] < 1e-12, dist
    np.testing.assert_array_equal(logistic.iterations_to_separate(trace.separated[-1:]),
                                  [_first_separated(reference, z)])


def _first_separated(params, z):
    ok = np.all(params @ z.T > 0, axis=1)
    return int(np.argmax(ok)) if ok.any() else -1


def test_thm_4_1_two_point_example():
    ds = separable.two_point()
    gammas = np.array([10.0, 100.0, 1000.0, 1e4])
    with jax.enable_x64(True):
        trace = logistic.sweep(ds.features, ds.labels, gammas, 2)
    params = np.asarray(trace.params)
    np.testing.assert_allclose(params[:, 1], gammas[:, None] * [0.5, 0.75], rtol=1e-14)
    loss1 = 0.5 * (np.logaddexp(0, gammas / 4) + np.logaddexp(0, -3.5 * gammas))
    np.testing.assert_allclose(trace.loss[:, 1], loss1, rtol=1e-12)
    assert np.all(np.diff(np.asarray(trace.loss[:, 1])) > 0)  # grows without bound in gamma
    assert float(trace.loss[-1, 1]) == pytest.approx(1e4 / 8)  # ~ gamma / 8 for large gamma
    np.testing.assert_allclose(params[-2:, 2] / gammas[-2:, None], [[1.0, 0.25]] * 2, atol=1e-12)
    assert not np.any(np.asarray(trace.separated[:, 1]))
    assert np.all(np.asarray(trace.separated[:, 2]))
    assert np.all(np.asarray(trace.accuracy[:, 2]) == 1.0)
    np.testing.assert_allclose(trace.grad_norm[-1, 1], np.sqrt(2) / 2, rtol=1e-12)
    assert float(trace.grad_norm[-1, 2]) < 1e-100
    assert float(trace.loss[-1, 2]) < 1e-100


def test_table_1_worst_case_rows():
    """Tyurin's Table 1 (worst case, n = 1000): Normalized LR+GD 2, 2, 16, 157 iterations at
    gamma = 100, 10, 1, 0.1; LR+GD at gamma = 100: 308."""
    ds = separable.worst_case(1000)
    with jax.enable_x64(True):
        norm = logistic.sweep(ds.features, ds.labels, [100.0, 10.0, 1.0, 0.1], 200,
                              rule="normalized", keep_params=False)
        plain = logistic.sweep(ds.features, ds.labels, [100.0], 400, keep_params=False)
    np.testing.assert_array_equal(logistic.iterations_to_separate(norm.separated),
                                  [2, 2, 16, 157])
    np.testing.assert_array_equal(logistic.iterations_to_separate(plain.separated), [308])


def test_iterations_to_separate():
    sep = np.array([[False, False, True, True], [False] * 4, [True, False, True, False]])
    np.testing.assert_array_equal(logistic.iterations_to_separate(sep), [2, -1, 0])


def test_bad_input_messages(data):
    features, labels = data
    for bad in ([0.0], [-1.0, 1.0], [np.inf], []):
        with pytest.raises(ValueError, match="gamma"):
            logistic.sweep(features, labels, bad, 3)
    with pytest.raises(ValueError, match="gamma"):
        logistic.run(features, labels, 0.0, 3)
    with pytest.raises(ValueError, match="empty"):
        logistic.sweep(np.zeros((0, 5)), np.zeros(0), [1.0], 3)
    with pytest.raises(ValueError, match="Valid choices"):
        logistic.sweep(features, labels, [1.0], 3, rule="adam")


def test_mixed_rules_in_one_sweep(data):
    features, labels = data
    gammas = [0.5, 0.5, 2.0]
    rules = ["constant", "normalized", "risk_adaptive"]
    with jax.enable_x64(True):
        mixed = logistic.sweep(features, labels, gammas, 8, rule=rules)
        for g, (gamma, rule) in enumerate(zip(gammas, rules, strict=True)):
            alone = logistic.run(features, labels, gamma, 8, rule=rule)
            np.testing.assert_allclose(mixed.params[g], alone.params, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="one per step size"):
        logistic.sweep(features, labels, gammas, 3, rule=rules[:2])


def test_two_point_first_loss_against_one_numpy_gd_step():
    ds = separable.two_point()
    gammas = np.array([1e-3, 0.5, 3.0, 40.0, 1e3, 1e6])
    expected = []
    for gamma in gammas:  # theta_1 from the paper's GD formulas, loss from its margins
        theta1 = np_gd(ds.features, ds.labels, gamma, 1)[1]
        m = ds.labels * (ds.features @ theta1)
        expected.append(np.mean(np.logaddexp(0.0, -m)))
    np.testing.assert_allclose(logistic.two_point_first_loss(gammas), expected, rtol=1e-12)
    assert logistic.two_point_first_loss(1e6) == pytest.approx(1e6 / 8, rel=1e-12)


def test_normalized_gd_bound_closed_form_holds_on_the_worst_case():
    n, gamma = 50, 1.0
    ds = separable.worst_case(n)
    radius = separable.radius(ds.features)
    bound = logistic.normalized_gd_bound(n, radius, 0.5, gamma)
    assert bound == pytest.approx(1.25 / 0.25 + 2 * np.log(2 * n - 1) / (gamma * 0.25))
    iterations = int(np.argmax([np.all((ds.labels[:, None] * ds.features) @ th > 0)
                                for th in np_gd(ds.features, ds.labels, gamma, 60,
                                                normalized=True)]))
    assert 0 < iterations <= bound
    with pytest.raises(ValueError, match="mu"):
        logistic.normalized_gd_bound(n, radius, 0.0, gamma)
    with pytest.raises(ValueError, match="gamma > 0"):
        logistic.normalized_gd_bound(n, radius, 0.5, -1.0)
