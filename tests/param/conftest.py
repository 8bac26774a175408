"""Fixtures of the lrx.param tests."""

import jax
import jax.numpy as jnp
import pytest

from tests.param._common import M, N


@pytest.fixture(scope="module")
def w():
    return jax.random.normal(jax.random.key(0), (M, N), jnp.float32) * 0.1
