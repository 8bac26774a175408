"""Linearly separable binary classification data for the large-step logistic-regression study.

Reference: A. Tyurin, "From Logistic Regression to the Perceptron Algorithm: Exploring Gradient
Descent with Large Step Sizes", arXiv 2412.08424 (2024).

Notation of the paper: data ``{(a_i, y_i)}_{i=1..n}``, ``a_i in R^d``, ``y_i in {-1, +1}``;
margin ``mu = max_{||theta||=1} min_i y_i a_i^T theta`` and radius ``R = max_i ||a_i||``. Every
classifier is homogeneous (``sign(a^T theta)``, no bias), as in the paper.

Contents:
  * :func:`planted` -- synthetic data with a planted unit separator ``w*``, ``y_i w*^T a_i >= mu``
    and ``||a_i|| <= R`` (so the true margin is at least ``mu``).
  * :func:`worst_case` -- the lower-bound construction of Thm 5.1: one point ``(0.5, -1)`` with
    label +1 and ``n - 1`` points ``(-0.5, -1)`` with label -1 (margin exactly 0.5, attained by
    ``theta = (1, 0)``; ``R = sqrt(1.25)``).
  * :func:`two_point` -- the example of Thm 4.1: ``(1, -1)`` with label +1, ``(-1, -4)`` with -1.
  * :func:`digits_pair` -- two classes of scikit-learn's bundled 8x8 digits (no download), pixels
    scaled to [0, 1], labels +1 / -1, checked to be linearly separable through the origin.
  * :func:`max_margin` -- the margin ``mu`` computed through its dual: ``mu`` equals the distance
    from the origin to the convex hull of ``{y_i a_i}`` (a min-norm-point problem solved with
    non-negative least squares); it returns a certified lower bound and an upper bound on ``mu``.
  * :func:`check_separable` -- raises ``ValueError`` for empty or non-separable data.

All functions return NumPy float64 arrays; they are deterministic given ``seed``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.optimize


class Dataset(NamedTuple):
    """A binary classification dataset.

    Attributes:
      features: ``(n, d)`` float64, the ``a_i``.
      labels: ``(n,)`` float64 in ``{-1, +1}``, the ``y_i``.
      name: a short description.
    """

    features: np.ndarray
    labels: np.ndarray
    name: str


class Margin(NamedTuple):
    """The margin of a dataset (see :func:`max_margin`).

    Attributes:
      lower: ``min_i y_i a_i^T theta`` at the returned unit ``theta`` (a certified lower bound on
        ``mu``; ``<= 0`` means no separator was found).
      upper: the norm of a point of the convex hull of ``{y_i a_i}`` (an upper bound on ``mu``).
      theta: ``(d,)`` the unit direction attaining ``lower``.
    """

    lower: float
    upper: float
    theta: np.ndarray


def validate(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checks shapes and labels; returns float64 copies. Raises ValueError with a clear message."""
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be an (n, d) matrix, got shape {features.shape}.")
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"the dataset is empty (features of shape {features.shape}); "
                         "need n >= 1 samples with d >= 1 features.")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must have shape ({features.shape[0]},) to match the features, "
                         f"got {labels.shape}.")
    if not np.all(np.isin(labels, (-1.0, 1.0))):
        raise ValueError("labels must be -1 or +1; got values "
                         f"{sorted(set(np.unique(labels).tolist()) - {-1.0, 1.0})[:5]}.")
    if not (np.all(np.isfinite(features))):
        raise ValueError("features contain NaN or inf.")
    return features, labels


def radius(features: np.ndarray) -> float:
    """``R = max_i ||a_i||`` of ``(n, d)`` features."""
    return float(np.max(np.linalg.norm(np.asarray(features, np.float64), axis=1)))


def max_margin(features: np.ndarray, labels: np.ndarray, *, penalty: float = 1e4) -> Margin:
    """The margin ``mu = max_{||theta||=1} min_i y_i a_i^T theta`` of a dataset.

    Uses the duality ``mu = min_{p in conv{z_i}} ||p||`` (``z_i = y_i a_i``; valid when ``mu > 0``):
    the min-norm point is found by NNLS on ``min_{alpha >= 0} ||Z^T alpha||^2 +
    penalty * (1^T alpha - 1)^2``, then ``theta = p / ||p||`` with ``p = Z^T alpha / 1^T alpha``.
    ``lower = min_i z_i^T theta`` is exact for that ``theta`` (so it is a certified lower bound on
    ``mu``) and ``upper = ||p||`` is an upper bound; for separable data they agree to about 1e-6.

    Args:
      features: ``(n, d)``.
      labels: ``(n,)`` in ``{-1, +1}``.
      penalty: weight of the simplex constraint in the NNLS problem (relative to ``max ||z_i||^2``).
    """
    features, labels = validate(features, labels)
    z = labels[:, None] * features
    scale = max(radius(z), 1e-300)
    zs = z / scale
    weight = np.sqrt(penalty)
    matrix = np.vstack([zs.T, weight * np.ones((1, zs.shape[0]))])
    target = np.concatenate([np.zeros(zs.shape[1]), [weight]])
    alpha, _ = scipy.optimize.nnls(matrix, target, maxiter=50 * matrix.shape[1])
    p = (zs.T @ alpha) / max(alpha.sum(), 1e-300)
    norm = float(np.linalg.norm(p))
    if norm <= 1e-12:
        return Margin(lower=0.0, upper=0.0, theta=np.zeros(z.shape[1]))
    theta = p / norm
    lower = float(np.min(z @ theta))
    return Margin(lower=lower, upper=norm * scale, theta=theta)


def check_separable(features: np.ndarray, labels: np.ndarray, *, tol: float = 1e-9) -> Margin:
    """Returns :func:`max_margin` or raises ValueError if the data are empty or not linearly
    separable through the origin (``mu <= tol * R``)."""
    features, labels = validate(features, labels)
    margin = max_margin(features, labels)
    if margin.lower <= tol * max(radius(features), 1e-300):
        raise ValueError(
            "the data are not linearly separable through the origin (largest margin found "
            f"{margin.lower:.3g}, upper bound {margin.upper:.3g}); the perceptron / separation "
            "study needs separable data: use other classes, add features, or drop the "
            "separation requirement.")
    return margin


def planted(n: int, d: int, *, mu: float, radius_bound: float = 1.0, spread: float = 1.0,
            seed: int = 0) -> Dataset:
    """Synthetic separable data with margin at least ``mu`` and radius at most ``radius_bound``.

    A unit separator ``w*`` is drawn at random; points are drawn uniformly in the ball of radius
    ``radius_bound``; labels are ``sign(w*^T a)`` (ties broken to +1); the component along ``w*``
    is then mapped from ``c`` to ``y (mu + spread |c| (R - mu) / R)`` and the orthogonal part is
    shrunk when needed so that ``||a_i|| <= R``. Hence ``y_i w*^T a_i >= mu`` for all ``i``; a
    small ``spread`` packs the points near the separating hyperplane (harder problems).

    Args:
      n: number of samples (>= 1).
      d: dimension (>= 2).
      mu: planted margin, ``0 < mu < radius_bound``.
      radius_bound: ``R``.
      spread: in ``[0, 1]``, how far beyond the margin the points spread along ``w*``.
      seed: NumPy seed.
    Returns:
      :class:`Dataset` with ``features (n, d)``, ``labels (n,)``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1 (an empty dataset has nothing to separate), got {n}.")
    if d < 2:
        raise ValueError(f"d must be >= 2, got {d}.")
    if not 0 < mu < radius_bound:
        raise ValueError(f"need 0 < mu < radius_bound, got mu={mu}, radius_bound={radius_bound}.")
    if not 0 <= spread <= 1:
        raise ValueError(f"spread must be in [0, 1], got {spread}.")
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(d)
    w /= np.linalg.norm(w)
    x = rng.standard_normal((n, d))
    x *= (radius_bound * rng.uniform(size=(n, 1)) ** (1.0 / d)) / np.linalg.norm(x, axis=1,
                                                                                  keepdims=True)
    c = x @ w
    y = np.where(c >= 0, 1.0, -1.0)
    ortho = x - c[:, None] * w
    c_new = y * (mu + spread * np.abs(c) * (radius_bound - mu) / radius_bound)
    room = np.sqrt(np.maximum(radius_bound**2 - c_new**2, 0.0))
    onorm = np.linalg.norm(ortho, axis=1)
    shrink = np.minimum(1.0, room / np.maximum(onorm, 1e-300))
    features = c_new[:, None] * w + shrink[:, None] * ortho
    name = f"planted(n={n}, d={d}, mu={mu}, R<={radius_bound}, spread={spread})"
    return Dataset(features, y, name)


def worst_case(n: int) -> Dataset:
    """The lower-bound dataset of Thm 5.1 (arXiv 2412.08424): ``a_1 = (0.5, -1)``, ``y_1 = +1``;
    ``a_i = (-0.5, -1)``, ``y_i = -1`` for ``i = 2..n``. Margin 0.5, ``R^2 = 1.25``.

    Args:
      n: number of samples (>= 2; the theorem assumes n >= 10).
    """
    if n < 2:
        raise ValueError(f"the worst-case dataset needs n >= 2 samples, got {n}.")
    features = np.tile(np.array([-0.5, -1.0]), (n, 1))
    features[0] = (0.5, -1.0)
    labels = -np.ones(n)
    labels[0] = 1.0
    return Dataset(features, labels, f"worst_case(n={n})")


def two_point() -> Dataset:
    """The two-point example of Thm 4.1: ``(1, -1)`` with +1 and ``(-1, -4)`` with -1."""
    return Dataset(np.array([[1.0, -1.0], [-1.0, -4.0]]), np.array([1.0, -1.0]), "two_point")


def digits_pair(positive: int = 3, negative: int = 8, *, require_separable: bool = True) -> Dataset:
    """Two classes of scikit-learn's bundled 8x8 digits (1797 images, no download).

    Pixels are scaled from [0, 16] to [0, 1]; ``positive`` gets label +1, ``negative`` -1.

    Args:
      positive: digit of class +1 (0..9).
      negative: digit of class -1 (0..9, != positive).
      require_separable: raise ValueError if the pair is not linearly separable through 0.
    """
    digits = tuple(range(10))
    if positive not in digits or negative not in digits or positive == negative:
        raise ValueError(f"positive and negative must be two different digits in {digits}, "
                         f"got {positive} and {negative}.")
    from sklearn.datasets import load_digits

    data = load_digits()
    keep = np.isin(data.target, (positive, negative))
    features = data.data[keep].astype(np.float64) / 16.0
    labels = np.where(data.target[keep] == positive, 1.0, -1.0)
    if require_separable:
        check_separable(features, labels)
    return Dataset(features, labels, f"digits({positive} vs {negative})")
