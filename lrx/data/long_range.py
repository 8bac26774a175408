"""Long-range sequence tasks for the S4 study: the adding problem and sequential 8x8 digits.

* Adding problem (Hochreiter & Schmidhuber 1997; a standard long-range RNN/SSM benchmark, cf.
  the S4 paper, arXiv 2111.00396): inputs ``(L, 2)`` = (value ~ U[0, 1], marker); exactly two
  markers, one in each half of the sequence; target = sum of the two marked values. Predicting
  the mean (1.0) gives MSE 1/6.
* Sequential digits: scikit-learn's bundled 8x8 digits (1797 images, no download), pixels scaled to
  [0, 1], optionally upsampled ``k`` times per side (nearest neighbour) and read row by row, so the
  sequence length is ``64 k^2``; 10 classes. The split is deterministic given ``seed``.

Batches are generated inside ``jit`` from a PRNG key (:func:`adding_batch`, :func:`sample_batch`),
so they plug into :func:`lrx.train.scan.fit`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ADDING_BASELINE_MSE = 1.0 / 6.0


def adding_batch(key: jax.Array, batch_size: int, length: int) -> tuple[jax.Array, jax.Array]:
    """One batch of the adding problem.

    Args:
      key: PRNG key. batch_size: B (> 0). length: L (>= 2).
    Returns:
      ``(x (B, L, 2) float32, y (B,) float32)``.
    """
    if length < 2:
        raise ValueError(f"adding problem length must be >= 2, got {length}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    k_val, k_first, k_second = jax.random.split(key, 3)
    values = jax.random.uniform(k_val, (batch_size, length))
    half = length // 2
    first = jax.random.randint(k_first, (batch_size,), 0, half)
    second = jax.random.randint(k_second, (batch_size,), half, length)
    pos = jnp.arange(length)
    markers = ((pos == first[:, None]) | (pos == second[:, None])).astype(jnp.float32)
    y = jnp.sum(values * markers, axis=1)
    return jnp.stack([values, markers], axis=-1), y


class Split(NamedTuple):
    """A classification split: ``x (n, L, 1)`` float32, ``y (n,)`` int32."""

    x: np.ndarray
    y: np.ndarray


def sequential_digits(upsample: int = 1, test_fraction: float = 0.2, seed: int = 0
                      ) -> tuple[Split, Split]:
    """Sequential 8x8 digits (scikit-learn's bundled set), returned as ``(train, test)``.

    Args:
      upsample: k >= 1; each image becomes ``8k x 8k`` (nearest neighbour), length ``64 k^2``.
      test_fraction: fraction of the 1797 images held out (0 < f < 1).
      seed: seed of the shuffle.
    """
    if isinstance(upsample, bool) or not isinstance(upsample, (int, np.integer)) or upsample < 1:
        raise ValueError(f"upsample must be an integer >= 1, got {upsample!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0                     # (n, 8, 8)
    images = np.kron(images, np.ones((1, upsample, upsample), np.float32))
    x = images.reshape(len(images), -1, 1)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    test, train = order[:n_test], order[n_test:]
    return Split(x[train], y[train]), Split(x[test], y[test])


def sample_batch(key: jax.Array, x: jax.Array, y: jax.Array, batch_size: int
                 ) -> tuple[jax.Array, jax.Array]:
    """A batch of ``batch_size`` examples drawn uniformly with replacement from on-device
    ``x (n, ...)``, ``y (n,)`` (jit-friendly)."""
    idx = jax.random.randint(key, (batch_size,), 0, x.shape[0])
    return x[idx], y[idx]
