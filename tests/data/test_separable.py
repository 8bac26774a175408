"""lrx.data.separable: planted margin and radius, the paper's constructions, digits pairs, and the
margin solver against closed forms."""

import numpy as np
import pytest

from lrx.data import separable


def test_planted_margin_radius_and_determinism():
    ds = separable.planted(300, 5, mu=0.05, radius_bound=2.0, spread=0.3, seed=3)
    assert ds.features.shape == (300, 5) and ds.labels.shape == (300,)
    assert set(np.unique(ds.labels)) <= {-1.0, 1.0}
    assert np.max(np.linalg.norm(ds.features, axis=1)) <= 2.0 + 1e-12
    margin = separable.max_margin(ds.features, ds.labels)
    assert margin.lower >= 0.05 - 1e-9  # the planted separator already achieves mu
    assert margin.lower <= margin.upper + 1e-12
    again = separable.planted(300, 5, mu=0.05, radius_bound=2.0, spread=0.3, seed=3)
    np.testing.assert_array_equal(ds.features, again.features)


def test_worst_case_construction():
    ds = separable.worst_case(10)
    assert ds.features.shape == (10, 2)
    np.testing.assert_array_equal(ds.features[0], [0.5, -1.0])
    np.testing.assert_array_equal(ds.features[1:], np.tile([-0.5, -1.0], (9, 1)))
    np.testing.assert_array_equal(ds.labels, [1.0] + [-1.0] * 9)
    # margin 0.5 at theta = (1, 0): z = (0.5, -1) and (0.5, 1) are symmetric about the x axis.
    margin = separable.max_margin(ds.features, ds.labels)
    assert margin.lower == pytest.approx(0.5, abs=1e-9)
    np.testing.assert_allclose(np.abs(margin.theta), [1.0, 0.0], atol=1e-7)
    assert separable.radius(ds.features) ** 2 == pytest.approx(1.25)


def test_max_margin_closed_forms():
    # z1 = (1, 0), z2 = (0, 1): the min-norm point of the segment is (1/2, 1/2), mu = 1/sqrt 2.
    margin = separable.max_margin(np.array([[1.0, 0.0], [0.0, -1.0]]), np.array([1.0, -1.0]))
    assert margin.lower == pytest.approx(1 / np.sqrt(2), abs=1e-9)
    assert margin.upper == pytest.approx(1 / np.sqrt(2), abs=1e-9)
    # A vertex is the min-norm point: z = (1, 0) and (1, 3): mu = 1 at theta = (1, 0).
    margin = separable.max_margin(np.array([[1.0, 0.0], [1.0, 3.0]]), np.ones(2))
    assert margin.lower == pytest.approx(1.0, abs=1e-9)
    # Thm 4.1's two points, z = (1, -1) and (1, 4): compare with a brute-force angle search.
    ds = separable.two_point()
    z = ds.labels[:, None] * ds.features
    angles = np.linspace(-np.pi, np.pi, 200001)
    dirs = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    brute = np.max(np.min(dirs @ z.T, axis=1))
    assert separable.max_margin(ds.features, ds.labels).lower == pytest.approx(brute, abs=1e-8)


def test_non_separable_and_empty_data_raise():
    with pytest.raises(ValueError, match="not linearly separable"):
        separable.check_separable(np.array([[1.0, 2.0], [1.0, 2.0]]), np.array([1.0, -1.0]))
    xor = np.array([[1.0, 1.0], [-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])
    with pytest.raises(ValueError, match="not linearly separable"):
        separable.check_separable(xor, np.array([1.0, 1.0, -1.0, -1.0]))
    with pytest.raises(ValueError, match="empty"):
        separable.check_separable(np.zeros((0, 3)), np.zeros(0))
    with pytest.raises(ValueError, match="-1 or \\+1"):
        separable.validate(np.ones((2, 2)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="n must be >= 1"):
        separable.planted(0, 3, mu=0.1)
    with pytest.raises(ValueError, match="mu"):
        separable.planted(10, 3, mu=2.0)


def test_digits_pair():
    ds = separable.digits_pair(1, 8)
    assert ds.features.shape[1] == 64 and ds.features.shape[0] > 300
    assert ds.features.min() >= 0.0 and ds.features.max() <= 1.0
    assert set(np.unique(ds.labels)) == {-1.0, 1.0}
    assert separable.max_margin(ds.features, ds.labels).lower > 0
    with pytest.raises(ValueError, match="two different digits"):
        separable.digits_pair(3, 3)
