"""Fine-tuning pieces shared by the spectra study (``experiments/spectra.py``, part 2) and the
fine-tuning table (``experiments/finetune_table.py``): the one place that trains a (factored)
LLaMA through the shared loop, flattens parameter trees by path and measures a fine-tuned model
against its base (intruder dimensions, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
arXiv 2410.21228; effective rank of the update, RankMe, arXiv 2210.02157).

Not an experiment (excluded from ``experiments.available()``): imported, never dispatched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def flat(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` with paths joined by ``'/'`` (factored nodes are flattened too)."""
    import jax

    from lrx.paths import path_str

    return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def matrix_paths(params: Any, pattern: str) -> list[str]:
    """Paths of the 2-D leaves of ``params`` whose path fully matches ``pattern``."""
    import re

    import jax

    from lrx.paths import path_str

    regex = re.compile(pattern)
    return [path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if getattr(x, "ndim", 0) == 2 and regex.fullmatch(path_str(p))]


def schedule(peak: float, warmup: int, steps: int, min_ratio: float) -> Callable:
    """Linear warmup to ``peak`` then cosine decay to ``peak * min_ratio``."""
    import optax

    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=min(warmup, max(steps - 1, 0)),
        decay_steps=steps, end_value=peak * min_ratio)


def per_shape(fn: Callable, flat_tree: dict[str, Any], paths: list[str],
              *extra: dict[str, Any]) -> dict[str, Any]:
    """``{path: fn(stack)[i]}``: applies a batched function once per matrix shape (one compiled
    program per shape instead of one per matrix); ``extra`` dicts are stacked alongside."""
    import jax.numpy as jnp

    shapes = {p: tuple(flat_tree[p].shape) for p in paths}
    out = {}
    for shape in dict.fromkeys(shapes.values()):
        group = [p for p in paths if shapes[p] == shape]
        args = [jnp.stack([jnp.asarray(d[p]) for p in group]) for d in (flat_tree, *extra)]
        result = fn(*args)
        out.update({p: result[i] for i, p in enumerate(group)})
    return out


def train(setup: Any, workdir: str, *, params: Any, frozen: Any, optimizer: Any, loss_fn: Callable,
          tokens: Any, batch_size: int, steps: int, schedule: Callable, eval_fn: Callable,
          eval_batches: Sequence[Any], eval_every: int, log_every: int,
          hooks: Sequence[Any] = ()) -> dict:
    """One run of the shared loop :func:`lrx.train.loop.train` in ``workdir`` (resumes from its
    checkpoint). ``setup`` provides ``c.seed``, ``mesh``, ``seq_len`` and
    ``batch_fn(tokens, batch_size)``. Raises SystemExit if the run was stopped by a signal."""
    import jax
    import jax.numpy as jnp

    from lrx.train import loop

    # The loop donates the state's buffers: train on copies so the inputs stay usable.
    params, frozen = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), (params, frozen))
    state = loop.create_state(params, optimizer, seed=setup.c.seed, frozen=frozen)
    result = loop.train(workdir=workdir, state=state, loss_fn=loss_fn, optimizer=optimizer,
                        batch_fn=setup.batch_fn(tokens, batch_size), total_steps=steps,
                        mesh=setup.mesh, eval_fn=eval_fn if eval_every else None,
                        eval_batches=eval_batches if eval_every else (),
                        eval_every=eval_every, log_every=log_every, checkpoint_every=0,
                        keep_checkpoints=1, learning_rate=schedule,
                        tokens_per_step=batch_size * setup.seq_len, hooks=hooks,
                        progress=False, tensorboard=False)
    if result["stopped_by"] != "end":  # SIGTERM/SIGINT: checkpointed, stop the whole study
        raise SystemExit(f"{workdir} stopped by {result['stopped_by']}; rerun the same command "
                         "to resume")
    return result


def update_spectra(base: Any, tuned: Any, paths: list[str], *, k: int,
                   thresholds: Sequence[float]) -> dict[str, Any]:
    """Intruder dimensions and the RankMe effective rank of ``Delta W = tuned - base`` over the
    matrices ``paths`` of two dense parameter trees.

    Returns:
      ``{'intruders': {eps: count summed over matrices}, 'delta_effective_rank': mean over
      matrices}``. Intruders use output-space vectors (right singular vectors of the Flax
      ``(in, out)`` kernel = the paper's left singular vectors of the torch weight), top-``k``.
    """
    import jax
    import numpy as np

    from lrx.analysis import effective_rank, intruder_counts, max_cosine_similarity, singular_values

    fb, ft = flat(base), flat(tuned)
    similarity = per_shape(jax.jit(lambda b, t: max_cosine_similarity(b, t, k=k, side="right")),
                           fb, paths, ft)
    delta = {p: np.asarray(ft[p], np.float32) - np.asarray(fb[p], np.float32) for p in paths}
    erank = per_shape(jax.jit(lambda d: effective_rank(singular_values(d))), delta, paths)
    return {"intruders": intruder_counts([similarity[p] for p in paths], thresholds),
            "delta_effective_rank": float(np.mean([float(erank[p]) for p in paths]))}


def merged(config: Any, defaults: Callable[[], Any]) -> Any:
    """``defaults()`` with every key of ``config`` (a ConfigDict of sections) written over it."""
    import ml_collections

    full = defaults()
    for section, values in config.items():
        if isinstance(values, ml_collections.ConfigDict):
            for key, value in values.items():
                full[section][key] = value
        else:
            full[section] = values
    return full


def model_config(c: Any):
    """The LLaMA config of ``c.model`` (a preset plus non-zero size overrides, byte vocabulary);
    a bad preset is a ConfigError naming the valid ones."""
    from experiments.common import ConfigError
    from lrx.data.text import VOCAB_SIZE
    from lrx.models.llama import preset

    overrides = {k: c.model[k] for k in ("hidden_size", "intermediate_size", "num_heads",
                                        "num_layers") if c.model[k]}
    try:
        return preset(c.model.preset, vocab_size=VOCAB_SIZE, **overrides)
    except ValueError as e:
        raise ConfigError(f"config.model: {e}") from None
