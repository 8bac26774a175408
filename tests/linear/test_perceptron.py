"""lrx.linear.perceptron against its definitions (Tyurin, arXiv 2412.08424): the batch step, the
closed-form trajectory on the worst-case dataset (Thm 5.1), the bounds n R^2/mu^2 (Thm 3.3) and
R^2/mu^2 (Thms 5.2, 5.3), and the classical Perceptron against a NumPy loop."""

import jax
import numpy as np
import pytest

from lrx.data import separable
from lrx.linear import logistic, perceptron


def test_batch_step_against_definition():
    rng = np.random.default_rng(0)
    features = rng.standard_normal((30, 4))
    labels = np.where(rng.standard_normal(30) > 0, 1.0, -1.0)
    theta = rng.standard_normal(4)
    wrong = [i for i in range(30) if labels[i] * features[i] @ theta <= 0]
    total = sum(labels[i] * features[i] for i in wrong)
    with jax.enable_x64(True):
        plain = perceptron.batch_step(theta, features, labels)
        first = perceptron.batch_step(theta, features, labels, first=True)
        normal = perceptron.batch_step(theta, features, labels, normalized=True)
    np.testing.assert_allclose(plain, theta + total / 30, rtol=1e-13)
    np.testing.assert_allclose(first, theta + total / 60, rtol=1e-13)
    np.testing.assert_allclose(normal, theta + total / len(wrong), rtol=1e-13)
    # The first step from 0: every sample is "misclassified" (margin 0 <= 0).
    with jax.enable_x64(True):
        trace = perceptron.batch_perceptron(features, labels, 3)
        ntrace = perceptron.batch_perceptron(features, labels, 3, normalized=True)
    z = labels[:, None] * features
    np.testing.assert_allclose(trace.params[1], z.sum(0) / 60, rtol=1e-13)
    np.testing.assert_allclose(ntrace.params[1], z.mean(0), rtol=1e-13)
    assert int(trace.mistakes[0]) == 30


@pytest.mark.parametrize("n", [10, 37, 100, 1000])
def test_worst_case_closed_form(n):
    """theta_k = (0.25 (1 + 2 (k-1)/n), (n - 2k)/(2n)) until the +1 point is classified, which
    happens first at k = floor((3n + 2)/10) + 1: iterations grow linearly in n."""
    ds = separable.worst_case(n)
    want = (3 * n + 2) // 10 + 1
    with jax.enable_x64(True):
        trace = perceptron.batch_perceptron(ds.features, ds.labels, want + 5)
    k = np.arange(1, want + 1)
    closed = np.stack([0.25 * (1 + 2 * (k - 1) / n), (n - 2 * k) / (2 * n)], axis=1)
    np.testing.assert_allclose(trace.params[1:want + 1], closed, rtol=1e-12, atol=1e-15)
    assert logistic.iterations_to_separate(trace.separated) == want
    # Thm 3.3's bound n R^2 / mu^2 = n * 1.25 / 0.25 = 5n holds.
    assert want <= 5 * n
    np.testing.assert_array_equal(trace.params[want], trace.params[-1])  # stops once separated


def test_bounds_on_planted_data():
    ds = separable.planted(400, 8, mu=0.02, spread=0.05, seed=2)
    margin = separable.max_margin(ds.features, ds.labels).lower  # certified lower bound on mu
    r2 = separable.radius(ds.features) ** 2
    with jax.enable_x64(True):
        batch = perceptron.batch_perceptron(ds.features, ds.labels, 400)
        normal = perceptron.batch_perceptron(ds.features, ds.labels, 400, normalized=True)
        classic = perceptron.perceptron(ds.features, ds.labels, max_epochs=500)
    t_batch = int(logistic.iterations_to_separate(batch.separated))
    t_norm = int(logistic.iterations_to_separate(normal.separated))
    assert 0 < t_batch <= len(ds.labels) * r2 / margin**2
    assert 0 < t_norm <= r2 / margin**2
    assert bool(classic.converged) and 0 < int(classic.updates) <= r2 / margin**2
    z = ds.labels[:, None] * ds.features
    assert np.all(z @ np.asarray(classic.params) > 0)


def test_classical_perceptron_against_numpy_loop():
    ds = separable.planted(60, 3, mu=0.05, spread=0.2, seed=4)
    z = ds.labels[:, None] * ds.features
    theta, updates, epochs = np.zeros(3), 0, 0
    while True:
        epochs += 1
        mistakes = 0
        for zi in z:
            if zi @ theta <= 0:
                theta, mistakes = theta + zi, mistakes + 1
        updates += mistakes
        if mistakes == 0:
            break
    with jax.enable_x64(True):
        result = perceptron.perceptron(ds.features, ds.labels)
    np.testing.assert_allclose(result.params, theta, rtol=1e-12)
    assert (int(result.updates), int(result.epochs), bool(result.converged)) == (updates, epochs,
                                                                                 True)
    with jax.enable_x64(True):
        capped = perceptron.perceptron(ds.features, ds.labels, max_epochs=1)
    assert int(capped.epochs) == 1 and bool(capped.converged) == (epochs == 1)


def test_bad_input():
    with pytest.raises(ValueError, match="empty"):
        perceptron.batch_perceptron(np.zeros((0, 2)), np.zeros(0), 3)
    with pytest.raises(ValueError, match="empty"):
        perceptron.perceptron(np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="max_epochs"):
        perceptron.perceptron(np.ones((2, 2)), np.ones(2), max_epochs=0)


def test_worst_case_iterations_against_a_numpy_batch_perceptron():
    # independent float64 loop of the Batch Perceptron (first step halved) on Thm 5.1's dataset
    for n in (2, 3, 7, 10, 11, 23, 48, 61):
        ds = separable.worst_case(n)
        z = ds.labels[:, None] * ds.features
        theta, t = np.zeros(2), 0
        while np.any(z @ theta <= 0):
            theta = theta + z[z @ theta <= 0].sum(axis=0) / n * (0.5 if t == 0 else 1.0)
            t += 1
        assert perceptron.worst_case_iterations(n) == t, n
    with pytest.raises(ValueError, match="n >= 2"):
        perceptron.worst_case_iterations(1)


def test_perceptron_bounds_closed_forms_and_errors():
    # worst-case dataset: R^2 = 1.25, mu = 0.5, so R^2/mu^2 = 5 and Thm 3.3 gives 5n
    ds = separable.worst_case(40)
    radius = separable.radius(ds.features)
    assert radius**2 == pytest.approx(1.25, rel=1e-15)
    assert perceptron.perceptron_bound(radius, 0.5) == pytest.approx(5.0, rel=1e-14)
    assert perceptron.batch_perceptron_bound(40, radius, 0.5) == pytest.approx(200.0, rel=1e-14)
    assert perceptron.worst_case_iterations(40) <= perceptron.batch_perceptron_bound(
        40, radius, 0.5)
    for r, mu in ((1.0, 0.0), (0.0, 0.0), (1.0, 2.0)):
        with pytest.raises(ValueError, match="margin"):
            perceptron.perceptron_bound(r, mu)
