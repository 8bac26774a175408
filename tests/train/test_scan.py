"""lrx.train.scan.fit against a NumPy float64 loop of plain SGD on a least-squares problem: the
iterates, the per-block mean losses (blocks need not divide the steps), the callback and the
per-step data keys."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrx.train.scan import fit

W_TRUE = np.array([[1.0, -2.0], [0.5, 0.0], [0.0, 3.0]])


def _batch_fn(key):
    x = jax.random.normal(key, (16, 3))
    return x, x @ jnp.asarray(W_TRUE, jnp.float32)


def _loss_fn(w, batch):
    x, y = batch
    return jnp.mean((x @ w - y) ** 2)


def test_fit_matches_a_numpy_sgd_loop_with_block_mean_losses():
    key, lr, steps, every = jax.random.key(4), 0.05, 7, 3
    calls = []
    w, history = fit(_loss_fn, jnp.zeros((3, 2)), optax.sgd(lr), _batch_fn, steps, key=key,
                     log_every=every, callback=lambda step, loss: calls.append((step, loss)))
    # float64 reference: the same batches (step t: fold_in(key, t)), gradient 2 X^T (XW - Y) / size
    ref, losses = np.zeros((3, 2)), []
    for t in range(steps):
        x = np.asarray(_batch_fn(jax.random.fold_in(key, t))[0], np.float64)
        y = x @ W_TRUE
        losses.append(np.mean((x @ ref - y) ** 2))
        ref = ref - lr * 2 * x.T @ (x @ ref - y) / y.size
    np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(history["step"]), [3, 6, 7])
    block_means = [np.mean(losses[0:3]), np.mean(losses[3:6]), np.mean(losses[6:7])]
    np.testing.assert_allclose(np.asarray(history["loss"]), block_means, rtol=1e-5)
    assert [c[0] for c in calls] == [3, 6, 7]
    np.testing.assert_allclose([c[1] for c in calls], block_means, rtol=1e-5)


def test_fit_is_a_pure_function_of_key_and_steps_and_rejects_bad_counts():
    a, _ = fit(_loss_fn, jnp.zeros((3, 2)), optax.adam(0.1), _batch_fn, 5, key=jax.random.key(1),
               log_every=2)
    b, _ = fit(_loss_fn, jnp.zeros((3, 2)), optax.adam(0.1), _batch_fn, 5, key=jax.random.key(1),
               log_every=5)  # other blocks, same steps
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    with pytest.raises(ValueError, match="steps must be > 0"):
        fit(_loss_fn, jnp.zeros((3, 2)), optax.sgd(0.1), _batch_fn, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="log_every must be > 0"):
        fit(_loss_fn, jnp.zeros((3, 2)), optax.sgd(0.1), _batch_fn, 3, key=jax.random.key(0),
            log_every=0)


def test_fit_replicas_each_replica_is_the_run_done_alone_and_refreshes_stay_conds():
    """K = 3 seeds of GaLore (refresh every 2 steps, so the shared counter drives real conds)
    trained as one vmapped scan equal three separate ``fit`` runs; a frozen per-replica constant
    enters through ``constants``."""
    from lrx.optim import galore
    from lrx.train.scan import fit_replicas

    def loss_c(p, batch, c):
        x, y = batch
        return jnp.mean((x @ (p["w"] + c) - y) ** 2)

    opt = galore(0.05, rank=1, update_proj_gap=2)
    inits = [jnp.asarray(np.random.default_rng(s).normal(size=(3, 2)), jnp.float32)
             for s in range(3)]
    consts = [jnp.full((3, 2), 0.1 * s, jnp.float32) for s in range(3)]
    keys = jax.random.split(jax.random.key(7), 3)
    stacked, hist = fit_replicas(loss_c, {"w": jnp.stack(inits)}, opt, _batch_fn, 5, keys=keys,
                                 constants=jnp.stack(consts), log_every=2)
    assert hist["loss"].shape == (3, 3)
    for i in range(3):
        alone, h1 = fit(lambda p, b, c=consts[i]: loss_c(p, b, c), {"w": inits[i]}, opt,
                        _batch_fn, 5, key=keys[i], log_every=2)
        np.testing.assert_allclose(np.asarray(stacked["w"][i]), np.asarray(alone["w"]),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(hist["loss"][:, i]), np.asarray(h1["loss"]),
                                   rtol=1e-5)
    # different seeds really train differently
    assert not np.allclose(np.asarray(stacked["w"][0]), np.asarray(stacked["w"][1]))


def test_fit_replicas_rejects_leaves_without_the_replica_axis():
    from lrx.train.scan import fit_replicas

    with pytest.raises(ValueError, match="leading replica axis K=2"):
        fit_replicas(_loss_fn, jnp.zeros((2, 3, 2)), optax.sgd(0.1), _batch_fn, 3,
                     keys=jax.random.split(jax.random.key(0), 3))
