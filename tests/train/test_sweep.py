"""lrx.train.sweep: a replica of a vmapped sweep equals the same run done alone (AdamW, GaLore
across projector refreshes, a LoRA parameterization with frozen bases), the shared counters stay
unbatched, a diverging replica is held back while the others train, and a sweep through
``loop.train`` logs one row per replica and resumes exactly.

The solo runs use the plain optimizer (the peak lr baked into its schedule, no
``inject_hyperparams``), so the comparison is against an independent code path."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrx.optim
import lrx.param
from lrx.train import loop, sharding, sweep

STEPS = 5
LRS = (3e-3, 3e-2)
SEEDS = (0, 1)


def _batch(step):
    rng = np.random.default_rng([11, step])
    x = rng.normal(size=(1, 6, 8)).astype(np.float32)   # (micro_batches, B, features)
    return jnp.asarray(x)


def _loss_fn(params, frozen, batch, rng):
    full = lrx.param.combine(params, frozen) if frozen else params
    h = jnp.tanh(batch @ lrx.param.materialize(full["w1"]))
    out = h @ lrx.param.materialize(full["w2"])
    noise = 1e-3 * jax.random.normal(rng, ())          # the state's PRNG stream per replica
    return jnp.mean((out - batch[:, :4]) ** 2) + noise, {}


def _params(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w1": 0.3 * jax.random.normal(k1, (8, 6)), "w2": 0.3 * jax.random.normal(k2, (6, 4))}


def _unit(t):  # warm-up then decay, a schedule of peak 1
    return jnp.minimum(1.0, (t + 1) / 3) * (1.0 - 0.1 * t / STEPS)


def _adamw(schedule):
    return optax.adamw(schedule, weight_decay=0.1)


def _galore(schedule):  # refreshes at steps 0, 2, 4 of the 5
    return lrx.optim.galore(schedule, rank=2, update_proj_gap=2, scale=0.25,
                            mask={"w1": True, "w2": True})


def _run_alone(make_opt, lr, seed, params, frozen):
    opt = make_opt(lambda t: lr * _unit(t))
    state = loop.create_state(params, opt, seed=seed, frozen=frozen)
    step = jax.jit(loop.make_step(_loss_fn, opt))
    losses = []
    for t in range(STEPS):
        state, m = step(state, _batch(t))
        losses.append(float(m["loss"]))
    return state, np.asarray(losses)


def _run_sweep(make_opt, inits):
    factory = lambda learning_rate: make_opt(lambda t: learning_rate * _unit(t))  # noqa: E731
    states = [loop.create_state(p, sweep.sweep_optimizer(factory, lr), seed=seed, frozen=f)
              for lr, seed, (p, f) in zip(LRS, SEEDS, inits)]
    stacked = sweep.stack_states(states)
    step = jax.jit(sweep.make_sweep_step(_loss_fn, sweep.sweep_optimizer(factory, LRS[0]),
                                         sweep.replica_axes(states[0])))
    losses = []
    for t in range(STEPS):
        stacked, m = step(stacked, _batch(t))
        losses.append(np.asarray(m["loss"]))
        assert np.all(np.asarray(m["alive"]) == 1)
    return stacked, np.stack(losses)


def _check_replicas_equal_solo(make_opt, inits):
    stacked, losses = _run_sweep(make_opt, inits)
    assert int(stacked.step) == STEPS and np.ndim(stacked.step) == 0  # shared, not per replica
    np.testing.assert_allclose(sweep.learning_rates(stacked), LRS, rtol=1e-7)
    # replica 1: neither the lr the sweep's optimizer was built with nor the first seed
    (p, f), i = inits[1], 1
    alone, alone_losses = _run_alone(make_opt, LRS[i], SEEDS[i], p, f)
    got = sweep.replica(stacked, i)
    np.testing.assert_allclose(losses[:, i], alone_losses, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves((got.params, got.frozen)),
                    jax.tree_util.tree_leaves((alone.params, alone.frozen))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got.rng), np.asarray(alone.rng))
    # the two replicas really differ (lr and seed)
    assert not np.allclose(losses[:, 0], losses[:, 1])


def test_adamw_replica_equals_solo_run():
    _check_replicas_equal_solo(_adamw, [(_params(s), {}) for s in SEEDS])


def test_galore_replica_equals_solo_run_across_refreshes():
    _check_replicas_equal_solo(_galore, [(_params(s), {}) for s in SEEDS])


def test_lora_replica_equals_solo_run():
    inits = []
    for seed in SEEDS:
        tree = lrx.param.apply(_params(seed), [("w.*", lrx.param.factory("lora", rank=2))],
                               jax.random.key(100 + seed))
        inits.append(lrx.param.partition(tree))
    assert jax.tree_util.tree_leaves(inits[0][1])  # the bases are frozen, per replica
    _check_replicas_equal_solo(_adamw, inits)


def test_stack_states_rejects_different_shared_leaves():
    opt = optax.adam(1e-3)
    a = loop.create_state(_params(0), opt, seed=0)
    b = a.replace(step=a.step + 1)
    with pytest.raises(ValueError, match="shared leaf .*step.* differs"):
        sweep.stack_states([a, b])
    with pytest.raises(ValueError, match="at least one"):
        sweep.stack_states([])
    with pytest.raises(ValueError, match="learning_rate must be > 0"):
        sweep.sweep_optimizer(lambda learning_rate: optax.adam(learning_rate), 0.0)


# -- through loop.train ---------------------------------------------------------------------------

def _blowup_loss(params, frozen, batch, rng):
    loss, aux = _loss_fn(params, frozen, batch, rng)
    big = jnp.max(jnp.abs(params["w1"])) > 5.0             # a huge lr gets here in one step
    return jnp.where(big, jnp.nan, loss), aux


def _sweep_train(workdir, steps, lrs, **kw):
    factory = lambda learning_rate: optax.adam(lambda t: learning_rate * _unit(t))  # noqa: E731
    states = [loop.create_state(_params(0), sweep.sweep_optimizer(factory, lr), seed=0)
              for lr in lrs]
    return loop.train(
        workdir=str(workdir), state=sweep.stack_states(states), loss_fn=_blowup_loss,
        optimizer=sweep.sweep_optimizer(factory, lrs[0]),
        batch_fn=lambda t: np.asarray(_batch(t)[0]),
        total_steps=steps, mesh=sharding.make_mesh(), log_every=1, progress=False,
        tensorboard=False, replicas=[{"peak_lr": lr, "seed": 0} for lr in lrs],
        learning_rate=[lambda t, lr=lr: lr * _unit(t) for lr in lrs],
        eval_fn=lambda p, f, b: {"loss": _blowup_loss(p, f, b, jax.random.key(0))[0]},
        eval_batches=[np.asarray(_batch(99)[0])], eval_every=2, **kw)


def test_train_sweep_diverged_replica_and_resume(tmp_path):
    lrs = (1e-2, 50.0)                                     # replica 1 diverges at step 1
    straight = _sweep_train(tmp_path / "a", 4, lrs)
    info = straight["replicas"]
    assert info[0]["diverged_at_step"] is None and info[1]["diverged_at_step"] == 1
    rows = loop.read_metrics(str(tmp_path / "a"))
    assert {"step": 1, "replica": 1, "peak_lr": 50.0, "seed": 0,
            "diverged_at_step": 1} in rows
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows if r["replica"] == 0] == [1, 2, 3, 4]
    assert [r["step"] for r in train_rows if r["replica"] == 1] == [1]  # none after divergence
    r0 = [r for r in train_rows if r["replica"] == 0]
    np.testing.assert_allclose([r["lr"] for r in r0], [1e-2 * float(_unit(t)) for t in range(4)],
                               rtol=1e-6)
    assert len(straight["final_eval"]) == 2 and straight["final_eval"][0]["peak_lr"] == 1e-2
    # the held-back replica kept its last good (finite) state, learning rate now 0
    final = straight["state"]
    np.testing.assert_array_equal(sweep.learning_rates(final), np.float32([1e-2, 0.0]))
    assert bool(loop._all_finite(final))
    # stop at 2, resume to 4: same parameters, divergence remembered
    _sweep_train(tmp_path / "b", 4, lrs, stop_at=2)
    resumed = _sweep_train(tmp_path / "b", 4, lrs)
    assert resumed["resumed_from"] == 2
    for a, b in zip(jax.tree_util.tree_leaves(straight["state"]),
                    jax.tree_util.tree_leaves(resumed["state"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert resumed["replicas"][1]["diverged_at_step"] == 1


def test_train_sweep_all_diverged_raises_naming_it(tmp_path):
    with pytest.raises(loop.NonFiniteLoss, match="every replica") as e:
        _sweep_train(tmp_path, 3, (40.0, 50.0))
    assert e.value.step == 1


def test_unguarded_vmapped_step_names_the_replica(tmp_path):
    """A vmapped step without the ``alive`` metric cannot hold a replica back: the NaN check
    stops the run naming the replica and the step."""
    factory = lambda learning_rate: optax.adam(learning_rate)  # noqa: E731
    lrs = (1e-2, 50.0)
    states = [loop.create_state(_params(0), sweep.sweep_optimizer(factory, lr), seed=0)
              for lr in lrs]
    axes = sweep.replica_axes(states[0])
    plain = jax.vmap(loop.make_step(_blowup_loss, sweep.sweep_optimizer(factory, lrs[0])),
                     in_axes=(axes, None), out_axes=(axes, 0))
    with pytest.raises(loop.NonFiniteLoss, match=r"step 1 of replica 1 \(peak_lr=50") as e:
        loop.train(workdir=str(tmp_path), state=sweep.stack_states(states),
                   loss_fn=_blowup_loss, optimizer=sweep.sweep_optimizer(factory, lrs[0]),
                   batch_fn=lambda t: np.asarray(_batch(t)[0]), total_steps=3,
                   mesh=sharding.make_mesh(), progress=False, tensorboard=False,
                   replicas=[{"peak_lr": lr} for lr in lrs], step_fn=plain)
    assert e.value.step == 1
