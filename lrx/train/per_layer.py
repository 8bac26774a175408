"""Per-layer weight updates fused into the backward pass of a scanned layer stack.

GaLore ("GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection", Zhao et al.,
arXiv 2403.03507, Sec. 4.3 "per-layer weight updates"; official ``torchrun_main.py
--optimizer galore_adamw8bit_per_layer``, after LOMO, arXiv 2306.09782) updates each weight as
soon as its gradient exists (a PyTorch post-accumulate-grad hook per parameter), so the gradient
of the whole model is never held at once. Here the same happens for a model written as
``embed -> L identical layers (parameters stacked on a leading axis) -> head``:

1. forward: ``x_0 = embed(outer, batch)``, a ``fori_loop`` over the layers keeping each layer's
   input ``x_i`` (what a rematerialised scan keeps), ``loss = head(outer, x_L, batch)``;
2. backward, layer ``L-1`` down to ``0`` in a ``fori_loop``: re-run layer ``i`` under ``jax.vjp``
   (rematerialisation), get ``dW_i`` and ``dx_i``; update ``W_i`` at once with its slice of the
   optimizer state and write both back into the stacks in place (``dynamic_update_slice`` on
   the loop carry), so only one layer's gradient is alive at a time;
3. the outer parameters (embeddings, final norm, LM head: the tree without ``layers_key``) are
   updated last with the sum of their head and embedding gradients (2·V·H values, ~0.5 GiB at 7B
   in bf16 — held together, where the official hooks update them one tensor at a time).

The optimizer state is ``{'outer': optimizer.init(outer), 'layers': vmap(optimizer.init)(stack)}``:
every state leaf of the layer part has a leading layer axis, so layer ``i`` reads and writes its
own slice (counts included). Any optax transform whose update of one layer does not depend on
another layer works (AdamW, GaLore, Fira, APOLLO, FRUGAL with a per-matrix subspace, 8-bit
Adam); masks must be callables over the tree they are given (e.g.
``lambda p: lrx.optim.path_mask(p, lrx.optim.ATTN_MLP)``), since the optimizer sees one layer's
slice (paths like ``attn/q/kernel``) and the outer tree separately.

Not separable per layer, refused by :func:`check_separable`: FRUGAL ``subspace='blocks'`` (the
active blocks are drawn across the whole model each window) and ``stagger=True`` (refresh offsets
count every matrix of the model). Seeded random projections (APOLLO; GaLore ``projector=
'random'|'randomized'``; FRUGAL ``'random'|'randperm'``) draw one layer's slice at a time, so
their random matrices differ from the whole-stack draw of the ordinary step (same distribution).

Both loops carry the stacks and pass their carry through ``lax.optimization_barrier``: XLA:CPU
computes bf16 dots in float32, and without the barriers it converts the *whole* stacked weights
to float32 once outside the loops (llama_7b: ``f32[32,4096,11008]`` and ``f32[32,4096,4096]``
buffers in the loop tuples, 24 GiB of the compiled temporaries; 44.7 -> 22.0 GiB peak).

Deviations: global-norm clipping needs the whole gradient; ``clip_norm > 0`` clips each layer's
gradient and the outer gradient separately to that norm (per-layer clipping; the official
per-layer path clips nothing); an ``optax.clip_by_global_norm`` chained into ``optimizer`` acts
the same way, since the optimizer sees one slice at a time.

Gradient accumulation (a batch with ``M > 1`` micro-batches), which the official per-layer path
refuses, runs *layer-major*: the forward pass and the head run for each micro-batch in turn,
keeping every micro-batch's layer inputs (16-bit, ``M x L x B x T x H``) and head cotangent
(``M x B x T x H``); the backward loop then differentiates layer ``i`` for each micro-batch in turn,
sums the ``M`` gradients of that one layer and updates it with their mean. The update of each
layer is that of the ordinary accumulated step for *every* optimizer (refresh steps included:
the projector sees the whole batch's gradient), at the memory of one layer's gradient plus the
saved activations (llama_7b, 8 micro-batches of 1 x 256 tokens: 8 x 32 x 256 x 4096 x 2 bytes
= 0.5 GiB, against 12.55 GiB for the model's gradient). This replaces the issue's proposal of
accumulating in GaLore's projected space between refreshes, which is exact for pure GaLore only
(Fira, FRUGAL and APOLLO read the full-rank gradient) and cannot give a refresh its full
gradient. Compute is that of the ordinary accumulated step with a rematerialised scan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrx.optim.engine import after, from_int_view, int_view, late_zero
from lrx.train.step import TrainState

PyTree = Any


class PerLayer(NamedTuple):
    """``init(params) -> opt_state`` and ``step(state, batch) -> (state, metrics)``."""

    init: Callable[[PyTree], PyTree]
    step: Callable[[TrainState, PyTree], tuple[TrainState, dict]]


def check_separable(optimizer_name: str, options: Mapping[str, Any]) -> None:
    """Raises ValueError when the optimizer ``optimizer_name`` with ``options`` (its keyword
    arguments, e.g. ``{'subspace': 'blocks'}``) couples layers, so that per-layer updates cannot
    reproduce it."""
    if optimizer_name == "frugal" and options.get("subspace", "svd") == "blocks":
        raise ValueError("per-layer updates: FRUGAL subspace='blocks' draws the active blocks "
                         "across the whole model each window, which one layer cannot see; use "
                         "a per-matrix subspace ('svd', 'random', 'randperm', 'columns', 'rows') "
                         "or the ordinary step")
    if options.get("stagger", False):
        raise ValueError("per-layer updates: stagger=True offsets each matrix's refresh by its "
                         "index among all matrices of the model; set stagger=False")


def _split(params: Mapping, layers_key: str) -> tuple[dict, PyTree]:
    if layers_key not in params:
        raise ValueError(f"per-layer updates need the stacked layers under params[{layers_key!r}]"
                         f" (a scanned model, e.g. LlamaConfig(scan_layers=True)); the top-level "
                         f"keys are {sorted(params)}")
    return {k: v for k, v in params.items() if k != layers_key}, params[layers_key]


@jax.custom_vjp
def _lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
    """``table[ids]`` (rows; ``ids`` int, any shape) whose gradient is the scatter-add of the
    cotangent rows into zeros built after the cotangent (:func:`lrx.optim.engine.late_zero`),
    not at the start of the step (llama_7b: a float32 ``(32000, 4096)`` buffer, XLA:CPU's
    upcast of the bf16 scatter, live across both layer loops)."""
    return jnp.take(table, ids, axis=0)


def _lookup_fwd(table, ids):
    return jnp.take(table, ids, axis=0), (ids, jnp.zeros((0, *table.shape), table.dtype))


def _lookup_bwd(res, g):
    ids, like = res
    zeros = jnp.broadcast_to(late_zero(g).astype(like.dtype), like.shape[1:])
    return zeros.at[ids].add(g.astype(like.dtype)), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def _take(tree: PyTree, i: jax.Array) -> PyTree:
    """Entry ``i`` of every leaf's leading axis."""
    return jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _put(tree: PyTree, value: PyTree, i: jax.Array) -> PyTree:
    """``tree`` with entry ``i`` of every leaf's leading axis replaced by ``value``."""
    return jax.tree_util.tree_map(
        lambda a, v: jax.lax.dynamic_update_index_in_dim(a, v.astype(a.dtype), i, 0),
        tree, value)


def _clip(tree: PyTree, max_norm: float) -> PyTree:
    if not max_norm:
        return tree
    norm = optax.global_norm(tree)
    factor = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree_util.tree_map(lambda g: (g * factor).astype(g.dtype), tree)


def make_per_layer_step(embed_fn: Callable[[PyTree, PyTree], jax.Array],
                        layer_fn: Callable[[PyTree, jax.Array], jax.Array],
                        head_fn: Callable[[PyTree, jax.Array, PyTree], jax.Array],
                        optimizer: optax.GradientTransformation, *, layers_key: str = "layers",
                        clip_norm: float = 0.0) -> PerLayer:
    """A train step that updates each layer inside the backward pass (see the module docstring).

    Args:
      embed_fn: ``(outer_params, batch) -> x_0`` (e.g. ``(B, T, H)`` activations), row by row:
        with micro-batches its gradient is taken once over the rows of all of them.
      layer_fn: ``(layer_params, x) -> x`` for one layer (``layer_params`` = one slice of the
        stacked ``params[layers_key]``; same shape in and out).
      head_fn: ``(outer_params, x_L, batch) -> loss`` (float32 scalar).
      optimizer: any optax transform that is separable per layer (:func:`check_separable`);
        masks must be callables.
      layers_key: top-level key of the stacked layer parameters (leading axis = layers).
      clip_norm: > 0 clips each layer's gradient and the outer gradient to this norm separately.

    Returns:
      :class:`PerLayer`: ``init(params)`` builds the opt_state of a :class:`TrainState`
      (``{'outer': ..., 'layers': ...}``, layer leaves with a leading layer axis); ``step(state,
      batch)`` takes ``batch`` with a leading micro-batch axis ``M`` (as
      :func:`lrx.train.loop.make_step`; ``M > 1`` accumulates layer-major, module docstring)
      and returns the new state and ``{'loss', 'grad_norm'}`` (the mean loss over the
      micro-batches and the global norm of the unclipped mean gradient, as the ordinary step).
    """
    if clip_norm < 0:
        raise ValueError(f"clip_norm must be >= 0, got {clip_norm}")

    def init(params: PyTree) -> PyTree:
        outer, stack = _split(params, layers_key)
        return {"outer": optimizer.init(outer), "layers": jax.vmap(optimizer.init)(stack)}

    def forward_layers(x0, stack, num_layers):
        """``(x_L, inputs, stack)``: the layers run in a loop from ``x0``; ``inputs (L, ...)``
        holds each layer's input."""
        # The stacks travel as loop carries through optimization barriers: XLA:CPU computes
        # bf16 dots in float32 and would otherwise hoist a float32 copy of the whole stacked
        # weights out of the loops (llama_7b: f32[32,4096,11008] loop buffers, 24 GiB).
        def forward(i, carry):
            x, saved, stack = jax.lax.optimization_barrier(carry)
            saved = jax.lax.dynamic_update_index_in_dim(saved, int_view(x), i, 0)
            return layer_fn(_take(stack, i), x), saved, stack

        # The layer inputs are kept as their uint16 view (16-bit activations): the backward
        # loop slices them, and XLA:CPU computed the slice of a bf16 stack through a float32
        # copy of the whole stack (llama_7b: 128 MiB, alive through both loops).
        return jax.lax.fori_loop(
            0, num_layers, forward,
            (x0, jnp.zeros((num_layers, *x0.shape), int_view(x0).dtype), stack))

    def update_layer(g_layer, g_x, stack, layer_state, i):
        """Layer ``i`` updated with its gradient ``g_layer`` and written back into the stacks.
        The update starts once the whole layer is differentiated (its state slice, e.g. the step
        count that GaLore's refresh conds read, waits for ``g_x``): XLA:CPU otherwise ran the MLP
        refreshes (SVD workspaces) while the attention backward, with its float32 weight copies,
        was still pending, and sliced the old projectors at the start of the body."""
        layer = _take(stack, i)
        updates, new_state = optimizer.update(
            _clip(g_layer, clip_norm), after(_take(layer_state, i), g_x), layer)
        layer = optax.apply_updates(layer, updates)
        return _put(stack, layer, i), _put(layer_state, new_state, i)

    def finish(state, outer, stack, g_outer, layer_state, sq, loss):
        sq = sq + optax.global_norm(g_outer) ** 2
        updates, outer_state = optimizer.update(_clip(g_outer, clip_norm),
                                                state.opt_state["outer"], outer)
        outer = optax.apply_updates(outer, updates)
        params = dict(outer)
        params[layers_key] = stack
        if not isinstance(state.params, dict):
            params = type(state.params)(params)
        rng, _ = jax.random.split(jax.random.wrap_key_data(state.rng))
        new_state = state.replace(step=state.step + 1, params=params,
                                  opt_state={"outer": outer_state, "layers": layer_state},
                                  rng=jax.random.key_data(rng))
        return new_state, {"loss": loss, "grad_norm": jnp.sqrt(sq)}

    def step(state: TrainState, batch: PyTree) -> tuple[TrainState, dict]:
        leading = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
        if len(leading) != 1:
            raise ValueError("per-layer updates: every batch leaf needs the same leading "
                             f"micro-batch axis, got leading sizes {sorted(leading)}")
        if leading != {1}:
            return accumulating_step(state, batch, leading.pop())
        batch = jax.tree_util.tree_map(lambda x: x[0], batch)
        outer, stack = _split(state.params, layers_key)
        num_layers = jax.tree_util.tree_leaves(stack)[0].shape[0]

        x0, embed_vjp = jax.vjp(lambda o: embed_fn(o, batch), outer)

        x_last, inputs, stack = forward_layers(x0, stack, num_layers)
        # The head reads the outer parameters only once the forward loop is done: XLA:CPU's
        # float32 copy of the LM head for its matmuls (llama_7b: 500 MiB) was otherwise made
        # at the start of the step and kept across both loops.
        loss, (g_head, g_x) = jax.value_and_grad(head_fn, argnums=(0, 1))(
            after(outer, x_last), x_last, batch)

        def backward(k, carry):
            g_x, stack, layer_state, sq = jax.lax.optimization_barrier(carry)
            i = num_layers - 1 - k
            layer = _take(stack, i)
            _, layer_vjp = jax.vjp(layer_fn, layer, from_int_view(jax.lax.dynamic_index_in_dim(
                inputs, i, 0, keepdims=False), x0.dtype))
            g_layer, g_x = layer_vjp(g_x)
            sq = sq + optax.global_norm(g_layer) ** 2
            return (g_x, *update_layer(g_layer, g_x, stack, layer_state, i), sq)

        g_x, stack, layer_state, sq = jax.lax.fori_loop(
            0, num_layers, backward,
            (g_x, stack, state.opt_state["layers"], jnp.zeros((), jnp.float32)))
        (g_embed,) = embed_vjp(g_x)
        g_outer = jax.tree_util.tree_map(jnp.add, g_head, g_embed)
        return finish(state, outer, stack, g_outer, layer_state, sq, loss)

    def accumulating_step(state: TrainState, batch: PyTree, micro: int
                          ) -> tuple[TrainState, dict]:
        """``micro > 1`` micro-batches, layer-major (module docstring): gradients summed in the
        parameter dtype and divided by ``micro``, as :func:`lrx.train.loop.make_step`."""
        outer, stack = _split(state.params, layers_key)
        num_layers = jax.tree_util.tree_leaves(stack)[0].shape[0]
        micro_batch = lambda m: jax.tree_util.tree_map(  # noqa: E731
            lambda x: jax.lax.dynamic_index_in_dim(x, m, 0, keepdims=False), batch)
        x_shape = jax.eval_shape(embed_fn, outer, micro_batch(0))
        view = jax.eval_shape(int_view, x_shape)

        def forward(m, carry):
            inputs, g_xs, g_head_sum, loss_sum, stack = carry
            b = micro_batch(m)
            x_last, saved, stack = forward_layers(embed_fn(outer, b), stack, num_layers)
            loss, (g_head, g_x) = jax.value_and_grad(head_fn, argnums=(0, 1))(
                after(outer, x_last), x_last, b)
            inputs = jax.lax.dynamic_update_index_in_dim(inputs, saved, m, 0)
            g_xs = jax.lax.dynamic_update_index_in_dim(g_xs, g_x.astype(g_xs.dtype), m, 0)
            g_head_sum = jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype),
                                                g_head_sum, g_head)
            return inputs, g_xs, g_head_sum, loss_sum + loss, stack

        inputs, g_xs, g_head_sum, loss_sum, stack = jax.lax.fori_loop(
            0, micro, forward,
            (jnp.zeros((micro, num_layers, *view.shape), view.dtype),
             jnp.zeros((micro, *x_shape.shape), x_shape.dtype),
             jax.tree_util.tree_map(jnp.zeros_like, outer), jnp.zeros((), jnp.float32), stack))

        def backward(k, carry):
            g_xs, stack, layer_state, sq = jax.lax.optimization_barrier(carry)
            i = num_layers - 1 - k
            layer = _take(stack, i)

            def one(m, c):
                g_sum, g_xs = c
                x_in = from_int_view(jax.lax.dynamic_index_in_dim(
                    jax.lax.dynamic_index_in_dim(inputs, m, 0, keepdims=False), i, 0,
                    keepdims=False), x_shape.dtype)
                _, layer_vjp = jax.vjp(layer_fn, layer, x_in)
                g_layer, g_x = layer_vjp(jax.lax.dynamic_index_in_dim(g_xs, m, 0,
                                                                      keepdims=False))
                g_sum = jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), g_sum,
                                               g_layer)
                return g_sum, jax.lax.dynamic_update_index_in_dim(g_xs, g_x, m, 0)

            g_sum, g_xs = jax.lax.fori_loop(
                0, micro, one, (jax.tree_util.tree_map(jnp.zeros_like, layer), g_xs))
            g_layer = jax.tree_util.tree_map(lambda g: g / micro, g_sum)
            sq = sq + optax.global_norm(g_layer) ** 2
            return (g_xs, *update_layer(g_layer, g_xs, stack, layer_state, i), sq)

        g_xs, stack, layer_state, sq = jax.lax.fori_loop(
            0, num_layers, backward,
            (g_xs, stack, state.opt_state["layers"], jnp.zeros((), jnp.float32)))

        rows = lambda x: x.reshape((-1, *x.shape[2:]))  # noqa: E731
        _, embed_vjp = jax.vjp(lambda o: embed_fn(o, jax.tree_util.tree_map(rows, batch)), outer)
        (g_embed,) = embed_vjp(rows(g_xs))
        g_outer = jax.tree_util.tree_map(lambda a, g: (a + g.astype(a.dtype)) / micro,
                                         g_head_sum, g_embed)
        return finish(state, outer, stack, g_outer, layer_state, sq, loss_sum / micro)

    return PerLayer(init, step)


def llama_pieces(config: Any) -> tuple[Callable, Callable, Callable]:
    """``(embed_fn, layer_fn, head_fn)`` of :class:`lrx.models.llama.Llama` with ``config``
    (a :class:`~lrx.models.llama.LlamaConfig` with ``scan_layers=True``) for
    :func:`make_per_layer_step`, with the next-token cross-entropy loss on ``tokens (B, T+1)``
    (inputs ``[:, :-1]``, targets ``[:, 1:]``), the same numbers as ``Llama.apply``. The layer
    function is ``Block`` written out with its attention half recomputed in the backward pass
    (one more attention forward per layer and step, for less memory at the layer's backward;
    see the comment there)."""
    from lrx.models.llama import MLP, Attention, Linear, RMSNorm, rope_angles

    if not config.scan_layers:
        raise ValueError("llama_pieces needs LlamaConfig(scan_layers=True): per-layer updates "
                         "walk the stacked 'layers' parameters")
    dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)

    def embed_fn(outer, tokens):
        return _lookup(outer["embedding"], tokens[:, :-1]).astype(dtype)

    # Block.__call__ written out, with the attention half rematerialised in its backward pass,
    # from inputs read only once the cotangent exists (engine.after): the layer's backward then
    # makes the float32 copies of the four attention weights (XLA:CPU upcasts bf16 dots) just
    # before differentiating the attention, instead of keeping those of the re-run forward
    # through the whole MLP backward (llama_7b: 4 x 64 MiB at the peak of the per-layer step;
    # a plain jax.checkpoint did not move them, its recompute was scheduled at once; llama_7b
    # GaLore per-layer 8-bit 19.55 -> 19.49 GiB, 19.42 with GaLore's ordered refreshes). One
    # more attention forward per layer and step; same numbers.
    def attention_fwd_only(layer, x):
        cos, sin = rope_angles(jnp.arange(x.shape[1]), config.head_dim, config.rope_theta)
        normed = RMSNorm(config.rms_norm_eps, pdtype).apply({"params": layer["attn_norm"]}, x)
        return x + Attention(config).apply({"params": layer["attn"]}, normed, cos, sin)

    @jax.custom_vjp
    def attention(layer, x):
        return attention_fwd_only(layer, x)

    def attention_fwd(layer, x):
        return attention_fwd_only(layer, x), (layer, x)

    def attention_bwd(res, g):
        _, vjp = jax.vjp(attention_fwd_only, *after(res, g))
        return vjp(g)

    attention.defvjp(attention_fwd, attention_bwd)

    def layer_fn(layer, x):
        h = attention({k: layer[k] for k in ("attn_norm", "attn")}, x)
        normed = RMSNorm(config.rms_norm_eps, pdtype).apply({"params": layer["mlp_norm"]}, h)
        return h + MLP(config).apply({"params": layer["mlp"]}, normed)

    def head_fn(outer, x, tokens):
        x = RMSNorm(config.rms_norm_eps, pdtype).apply({"params": outer["final_norm"]}, x)
        logits = Linear(config.vocab_size, config.init_std, dtype, pdtype).apply(
            {"params": outer["lm_head"]}, x).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    return embed_fn, layer_fn, head_fn
