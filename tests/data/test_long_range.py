"""Adding problem and sequential digits (lrx.data.long_range)."""

import jax
import numpy as np
import pytest

from lrx.data import long_range


def test_adding_batch_semantics():
    x, y = long_range.adding_batch(jax.random.PRNGKey(0), 64, 50)
    x, y = np.asarray(x), np.asarray(y)
    assert x.shape == (64, 50, 2) and y.shape == (64,)
    markers = x[..., 1]
    np.testing.assert_array_equal(markers.sum(1), 2)
    assert np.all(markers[:, :25].sum(1) == 1) and np.all(markers[:, 25:].sum(1) == 1)
    np.testing.assert_allclose(y, (x[..., 0] * markers).sum(1), rtol=1e-6)
    assert np.all((x[..., 0] >= 0) & (x[..., 0] < 1))
    with pytest.raises(ValueError, match="length"):
        long_range.adding_batch(jax.random.PRNGKey(0), 4, 1)


def test_sequential_digits_split_and_upsampling():
    train, test = long_range.sequential_digits(upsample=2, seed=0)
    assert train.x.shape[1:] == (256, 1) and len(train.x) + len(test.x) == 1797
    assert len(test.x) == 359
    assert train.x.min() >= 0 and train.x.max() <= 1 and set(np.unique(train.y)) == set(range(10))
    img = train.x[0, :, 0].reshape(16, 16)
    np.testing.assert_array_equal(img[::2, ::2], img[1::2, 1::2])     # nearest-neighbour blocks
    again, _ = long_range.sequential_digits(upsample=2, seed=0)
    np.testing.assert_array_equal(train.y, again.y)
    with pytest.raises(ValueError, match="upsample"):
        long_range.sequential_digits(upsample=0)
    xb, yb = long_range.sample_batch(jax.random.PRNGKey(1), train.x, train.y, 8)
    assert xb.shape == (8, 256, 1) and yb.shape == (8,)
