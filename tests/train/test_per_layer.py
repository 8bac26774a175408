"""lrx.train.per_layer: per-layer updates fused into the backward pass give the parameters of the
ordinary step (whole gradient, then one optimizer update) for AdamW, GaLore, FRUGAL (svd
subspace), Fira and 8-bit Adam over steps that include projector refreshes; APOLLO (seeded random
projections drawn per slice) against a reference that applies the optimizer to each layer's
slice of the whole-model gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrx.optim as lo
from lrx.models.llama import Llama, preset
from lrx.train import loop
from lrx.train.per_layer import check_separable, llama_pieces, make_per_layer_step

CFG = preset("tiny", hidden_size=32, intermediate_size=48, num_heads=2, num_layers=3,
             vocab_size=64, max_len=16, scan_layers=True)
STEPS = 3       # update_proj_gap=2: refreshes at counts 0 and 2
MASK = lambda p: lo.path_mask(p, lo.ATTN_MLP)  # noqa: E731 - a callable works on any subtree

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-2, eps=1e-6, weight_decay=0.1),
    "galore": lambda: lo.galore(1e-2, rank=4, update_proj_gap=2, scale=0.25, mask=MASK,
                                weight_decay=0.1),
    "galore_reverse_std": lambda: lo.galore(1e-2, rank=4, update_proj_gap=2, mask=MASK,
                                            proj_type="reverse_std"),
    "frugal": lambda: lo.frugal(1e-2, density=0.25, subspace="svd", update_proj_gap=2,
                                mask=MASK),
    "fira": lambda: lo.fira(1e-2, rank=4, update_proj_gap=2, mask=MASK),
    # a user base optimizer: the refreshes run inside GaLore's update_all, one leaf at a time
    "galore_base_adam": lambda: lo.galore(1e-2, rank=4, update_proj_gap=2, mask=MASK,
                                          proj_type="reverse_std",
                                          base_optimizer=optax.scale_by_adam(eps=1e-6)),
}


def _setup():
    model = Llama(CFG)
    tokens = jax.random.randint(jax.random.key(1), (STEPS, 1, 2, 13), 0, CFG.vocab_size)
    params = model.init(jax.random.key(0), tokens[0, 0, :, :-1])["params"]

    def loss_fn(p, fz, batch, rng):  # noqa: ARG001
        logits = model.apply({"params": p}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), {}

    return params, tokens, loss_fn


def _steps(step, state, tokens):
    """``STEPS`` jitted steps; returns the state and the per-step losses and gradient norms."""
    step = jax.jit(step)
    losses, norms = [], []
    for t in range(STEPS):
        state, m = step(state, tokens[t])
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    return state, losses, norms


def _per_layer_run(params, tokens, opt, **kwargs):
    pl = make_per_layer_step(*llama_pieces(CFG), opt, **kwargs)
    state = loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={},
                            opt_state=pl.init(params),
                            rng=jax.random.key_data(jax.random.key(0)))
    return _steps(pl.step, state, tokens)


def _ordinary_run(params, tokens, loss_fn, opt):
    """The ordinary step (``loop.make_step``; micro-batches = ``tokens.shape[1]``)."""
    step = loop.make_step(loss_fn, opt, micro_batches=tokens.shape[1])
    return _steps(step, loop.create_state(params, opt, seed=0), tokens)


def _close(a, b, tol):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=tol, atol=tol)


FAST = ("adamw", "galore", "galore_base_adam")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
                                  for n in OPTIMIZERS])
def test_per_layer_equals_ordinary_step(name):
    params, tokens, loss_fn = _setup()
    opt = OPTIMIZERS[name]()
    state, losses, norms = _ordinary_run(params, tokens, loss_fn, opt)
    pl_state, pl_losses, pl_norms = _per_layer_run(params, tokens, opt)
    np.testing.assert_allclose(pl_losses, losses, rtol=1e-5)
    np.testing.assert_allclose(pl_norms, norms, rtol=1e-4)
    # Parameters moved (lr 1e-2) and agree to float32 tolerance after 3 steps.
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(params), strict=True))
    assert moved > 1e-3
    # FRUGAL's state-free part is signSGD on the residual: entries of the residual near zero
    # amplify float32 rounding differences of the two gradient computations.
    _close(pl_state.params, state.params, 1e-4 if name == "frugal" else 2e-5)
    # The layer state has a leading layer axis on every array leaf (its count included).
    for leaf in jax.tree_util.tree_leaves(pl_state.opt_state["layers"]):
        assert leaf.shape[0] == CFG.num_layers


MICRO = 3


@pytest.mark.parametrize("name", [n if n in ("galore", "galore_base_adam")
                                  else pytest.param(n, marks=pytest.mark.slow)
                                  for n in OPTIMIZERS])
def test_accumulation_equals_the_ordinary_accumulated_step(name):
    """3 micro-batches per step, layer-major: each layer's update is that of the ordinary step
    that averages the 3 micro-batch gradients of the whole model first (refreshes at counts 0
    and 2 see the whole batch's gradient)."""
    params, _, loss_fn = _setup()
    tokens = jax.random.randint(jax.random.key(2), (STEPS, MICRO, 2, 13), 0, CFG.vocab_size)
    opt = OPTIMIZERS[name]()
    state, losses, norms = _ordinary_run(params, tokens, loss_fn, opt)
    pl_state, pl_losses, pl_norms = _per_layer_run(params, tokens, opt)
    np.testing.assert_allclose(pl_losses, losses, rtol=1e-5)
    np.testing.assert_allclose(pl_norms, norms, rtol=1e-4)
    _close(pl_state.params, state.params, 1e-4 if name == "frugal" else 2e-5)
    # not the one-micro-batch step: the first micro-batch alone moves the weights elsewhere
    one, _, _ = _per_layer_run(params, tokens[:, :1], opt)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(one.params), jax.tree_util.tree_leaves(pl_state.params)))
    assert diff > 1e-3


def _per_slice_reference(params, tokens, loss_fn, opt):
    """The whole-model gradient (jax.grad), then ``opt`` applied to the outer tree and to each
    layer's slice as separate trees, each with its own state."""
    outer = {k: v for k, v in params.items() if k != "layers"}
    layers = [jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"])
              for i in range(CFG.num_layers)]
    s_outer, s_layers = opt.init(outer), [opt.init(lp) for lp in layers]
    grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, None, b, None)[0]))
    update = jax.jit(opt.update)  # one compile for the outer tree, one shared by the layer slices
    stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)
    for t in range(STEPS):
        g = grad({**outer, "layers": stack(layers)}, tokens[t, 0])
        u, s_outer = update({k: v for k, v in g.items() if k != "layers"}, s_outer, outer)
        outer = optax.apply_updates(outer, u)
        for i in range(CFG.num_layers):
            gi = jax.tree_util.tree_map(lambda a, i=i: a[i], g["layers"])
            u, s_layers[i] = update(gi, s_layers[i], layers[i])
            layers[i] = optax.apply_updates(layers[i], u)
    return {**outer, "layers": stack(layers)}


@pytest.mark.parametrize("name", [pytest.param("apollo", marks=pytest.mark.slow), "apollo_mini",
                                  pytest.param("adamw_8bit", marks=pytest.mark.slow)])
def test_per_slice_methods_equal_reference(name):
    """APOLLO's projection is drawn from (seed, leaf index, window) and 8-bit states are blocked
    per tensor: per layer the slice is its own tensor, so the reference applies the optimizer to
    each layer's slice of the whole-model gradient."""
    opt = {"apollo": lambda: lo.apollo(1e-2, rank=4, update_proj_gap=2, mask=MASK),
           "apollo_mini": lambda: lo.apollo_mini(1e-2, update_proj_gap=2, mask=MASK),
           "adamw_8bit": lambda: lo.adamw_8bit(1e-2, weight_decay=0.1, block_size=256,
                                               min_size=0)}[name]()
    params, tokens, loss_fn = _setup()
    ref = _per_slice_reference(params, tokens, loss_fn, opt)
    pl_state, _, _ = _per_layer_run(params, tokens, opt)
    _close(pl_state.params, ref, 2e-5)
    if name == "adamw_8bit":   # the states really are 8-bit, with a leading layer axis
        mu = pl_state.opt_state["layers"][0].mu["attn"]["q"]["kernel"]
        assert isinstance(mu, lo.QuantizedArray) and mu.codes.shape[0] == CFG.num_layers


@pytest.mark.slow
def test_per_layer_clipping_clips_each_group():
    """clip_norm: every layer's gradient and the outer gradient are scaled to norm <= clip_norm
    separately; with SGD (lr 1) the parameter change of each group is exactly the clipped
    gradient, whose norm must be min(norm, clip)."""
    params, tokens, loss_fn = _setup()
    clip = 1e-3
    pl = make_per_layer_step(*llama_pieces(CFG), optax.sgd(1.0), clip_norm=clip)
    state = loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={},
                            opt_state=pl.init(params), rng=jax.random.key_data(jax.random.key(0)))
    new, _ = jax.jit(pl.step)(state, tokens[0])
    g = jax.jit(jax.grad(lambda p: loss_fn(p, None, tokens[0, 0], None)[0]))(params)
    for i in range(CFG.num_layers):
        delta = jax.tree_util.tree_map(lambda a, b, i=i: a[i] - b[i], params["layers"],
                                       new.params["layers"])
        gi = jax.tree_util.tree_map(lambda a, i=i: a[i], g["layers"])
        norm = float(optax.global_norm(gi))
        assert norm > clip
        np.testing.assert_allclose(float(optax.global_norm(delta)), clip, rtol=1e-3)
    outer_delta = jax.tree_util.tree_map(lambda a, b: a - b,
                                         {k: v for k, v in params.items() if k != "layers"},
                                         {k: v for k, v in new.params.items() if k != "layers"})
    np.testing.assert_allclose(float(optax.global_norm(outer_delta)), clip, rtol=1e-3)


def test_refusals():
    with pytest.raises(ValueError, match="subspace='blocks'.*whole model"):
        check_separable("frugal", {"subspace": "blocks"})
    with pytest.raises(ValueError, match="stagger"):
        check_separable("galore", {"stagger": True})
    check_separable("frugal", {"subspace": "svd"})
    params, tokens, _ = _setup()
    pl = make_per_layer_step(*llama_pieces(CFG), optax.sgd(0.1))
    with pytest.raises(ValueError, match=r"params\['layers'\].*scan_layers"):
        pl.init({"embedding": params["embedding"]})
    state = loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={},
                            opt_state=pl.init(params), rng=jax.random.key_data(jax.random.key(0)))
    with pytest.raises(ValueError, match=r"same leading micro-batch axis.*\[1, 2\]"):
        pl.step(state, {"a": tokens[0], "b": jnp.concatenate([tokens[0], tokens[1]])})
    with pytest.raises(ValueError, match="scan_layers=True"):
        llama_pieces(preset("tiny"))
