"""Spectral study of low-rank training: gradient-rank emergence, projector drift, intruder
dimensions and WeLore's non-uniform rank reduction, on the tiny LLaMA and Shakespeare.

Three parts, one workdir (every training run goes through the shared loop ``lrx.train.loop.train``
in its own sub-directory, so each has its ``metrics.jsonl`` and resumes from its checkpoint):

1. **Pretraining spectra.** The model trains from scratch with AdamW, GaLore (``lrx.optim.galore``,
   "GaLore", arXiv 2403.03507) and LoRA on a frozen random base (``lrx.param.lora``, GaLore's LoRA
   baseline). Every ``analysis.every`` steps a hook takes the gradient of the loss with respect to
   the *dense* weight ``W`` (the materialised weight for LoRA, so all methods are measured on the
   same object) on the step's batch and logs, per attention/MLP matrix: the gradient's RankMe
   effective rank (arXiv 2210.02157), the fraction of its energy in the top-``analysis.rank``
   directions, the stable rank of ``W``, and the overlap (mean squared cosine of the principal
   angles) between the top-r gradient subspace on GaLore's ``std`` side now and at the previous
   analysis step -- the overlap of consecutive GaLore projectors if they were refreshed at these
   steps. Plots: heatmaps matrix x step, one panel per method.
2. **Fine-tuning and intruder dimensions** ("LoRA vs Full Fine-tuning: An Illusion of Equivalence",
   arXiv 2410.21228). The AdamW-pretrained model is fine-tuned on a play held out of pretraining,
   by full fine-tuning and by LoRA at several ranks. Reported: the fine-tuning play's held-out loss,
   the loss on the pretraining distribution (other held-out plays) before and after tuning, and the
   number of intruder dimensions (top-k singular vectors of the tuned matrix whose largest
   |cosine| with every pretrained singular vector is below epsilon; output-space vectors as in the
   paper, k and the epsilons from the config) summed over matrices.
3. **WeLore** ("From GaLore to WeLore", arXiv 2407.11239) on the AdamW-pretrained model: per-matrix
   rank-reduction ratios for target total reductions, the LRC / N-LRC split, the pretraining-
   distribution loss after compressing the LRCs to their kept rank versus a uniform truncation
   that drops the same number of singular values, and the rank correlation between a matrix's
   reduction ratio and the effective rank of its gradients late in pretraining (WeLore's claim:
   low-rank weights emerge where gradients are low rank).

Every run's data, model, parameterization and optimizer come from the LM builder's pieces
(``experiments.lm``). Outputs: ``summary.json``, ``pretrain.md``,
``finetune.md``, ``welore.md``, ``heatmap_*.png``, ``intruders.png``, ``welore.png``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import lrx.optim
import lrx.param
from experiments import common, finetuning, lm
from experiments.common import ConfigError
from experiments.finetuning import flat as _flat
from experiments.finetuning import matrix_paths as _matrix_paths
from experiments.finetuning import per_shape as _per_shape
from experiments.finetuning import schedule as _schedule
from experiments.finetuning import train as _train
from experiments.finetuning import update_spectra
from lrx.data import text
from lrx.models.llama import Llama
from lrx.paths import ATTN_MLP, path_str
from lrx.train import loop, sharding

METHODS = ("adamw", "galore", "lora")
FINETUNE_METHODS = ("full", "lora")
PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
MATRICES = ATTN_MLP  # the attention and MLP matrices (GaLore's recipe, lrx.paths.ATTN_MLP)
HEATMAPS = {
    "grad_effective_rank": "gradient effective rank (RankMe)",
    "grad_top_r_energy": "top-r gradient energy",
    "weight_stable_rank": "weight stable rank",
    "projector_overlap": "top-r gradient subspace overlap with previous analysis step",
    "galore_projector_overlap": "GaLore projector overlap across each refresh (optimizer state)",
}
log = logging.getLogger("lrx.spectra")


def defaults() -> ml_collections.ConfigDict:
    """The config schema with CPU defaults (about 15 minutes on 2 cores)."""
    c = ml_collections.ConfigDict()
    c.experiment = "spectra"
    c.seed = 0
    # Model: a preset of lrx.models.llama; a non-zero size field overrides the preset's.
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny", hidden_size=0, intermediate_size=0, num_heads=0, num_layers=0))
    c.data = ml_collections.ConfigDict(dict(
        val_plays=("macbeth", "twelfth-night", "richard-ii"),   # pretraining-distribution eval
        finetune_play="the-tempest",                             # held out for part 2
        finetune_val_fraction=0.1, seq_len=128, seed=0, eval_windows=64))
    c.pretrain = ml_collections.ConfigDict(dict(
        methods=METHODS, steps=500, batch_size=16, warmup_steps=50, min_lr_ratio=0.1,
        grad_clip=1.0, log_every=25, eval_every=100,
        adamw_learning_rate=3e-3, galore_learning_rate=1e-2, lora_learning_rate=1e-2))
    c.galore = ml_collections.ConfigDict(dict(
        rank=32, update_proj_gap=50, scale=0.25, proj_type="std"))
    c.lora = ml_collections.ConfigDict(dict(rank=32, alpha=64.0))
    c.analysis = ml_collections.ConfigDict(dict(every=25, rank=8, paths=MATRICES))
    c.finetune = ml_collections.ConfigDict(dict(
        enabled=True, methods=("full", "lora"), steps=200, batch_size=16, warmup_steps=20,
        learning_rate=1e-3,
        lora_learning_rate=1e-2, lora_ranks=(1, 4, 16), lora_alpha_ratio=2.0, eval_every=50,
        intruder_k=10, intruder_thresholds=(0.3, 0.5, 0.7)))
    c.welore = ml_collections.ConfigDict(dict(
        enabled=True, targets=(0.3, 0.5), min_ratio=0.4))
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Unknown keys, wrong types and impossible values, before any work."""
    common.check_keys(config, defaults())
    c = finetuning.merged(config, defaults)
    from lrx.data.text import shakespeare_plays
    from lrx.models.llama import PRESETS

    common.check_choice(c.model.preset, list(PRESETS), "model.preset")
    plays = list(shakespeare_plays())
    for play in c.data.val_plays:
        common.check_choice(play, plays, "data.val_plays[...]")
    common.check_choice(c.data.finetune_play, plays, "data.finetune_play")
    if c.data.finetune_play in c.data.val_plays:
        raise ConfigError(f"data.finetune_play={c.data.finetune_play!r} is also in "
                          "data.val_plays; the two held-out sets must differ")
    if not c.data.val_plays:
        raise ConfigError("data.val_plays must name at least one play")
    if not 0.0 < c.data.finetune_val_fraction < 1.0:
        raise ConfigError("data.finetune_val_fraction must be in (0, 1), got "
                          f"{c.data.finetune_val_fraction}")
    for key in ("data.seq_len", "data.eval_windows", "pretrain.steps", "pretrain.batch_size",
                "pretrain.log_every", "pretrain.adamw_learning_rate",
                "pretrain.galore_learning_rate", "pretrain.lora_learning_rate", "galore.rank",
                "galore.update_proj_gap", "galore.scale", "lora.rank", "lora.alpha",
                "analysis.rank", "finetune.steps", "finetune.batch_size",
                "finetune.learning_rate", "finetune.lora_learning_rate",
                "finetune.lora_alpha_ratio", "finetune.intruder_k"):
        section, leaf = key.split(".")
        common.check_positive(c[section][leaf], key)
    for key in ("pretrain.warmup_steps", "pretrain.grad_clip", "pretrain.eval_every",
                "pretrain.min_lr_ratio", "analysis.every", "finetune.warmup_steps",
                "finetune.eval_every", "model.hidden_size", "model.intermediate_size",
                "model.num_heads", "model.num_layers"):
        section, leaf = key.split(".")
        common.check_positive(c[section][leaf], key, allow_zero=True)
    if not c.pretrain.methods:
        raise ConfigError(f"pretrain.methods is empty; valid choices: {METHODS}")
    for method in c.pretrain.methods:
        common.check_choice(method, METHODS, "pretrain.methods[...]")
    common.check_choice(c.galore.proj_type, PROJ_TYPES, "galore.proj_type")
    if (c.finetune.enabled or c.welore.enabled) and "adamw" not in c.pretrain.methods:
        raise ConfigError("finetune and welore start from the AdamW-pretrained model: add "
                          "'adamw' to pretrain.methods or set finetune.enabled=False and "
                          "welore.enabled=False")
    for method in c.finetune.methods:
        common.check_choice(method, FINETUNE_METHODS, "finetune.methods[...]")
    for rank in c.finetune.lora_ranks:
        common.check_positive(rank, "finetune.lora_ranks[...]")
    for eps in c.finetune.intruder_thresholds:
        if not 0.0 < eps <= 1.0:
            raise ConfigError(f"finetune.intruder_thresholds[...]={eps} must be in (0, 1]")
    for target in c.welore.targets:
        if not 0.0 < target < 1.0:
            raise ConfigError(f"welore.targets[...]={target} must be in (0, 1)")
    if not 0.0 <= c.welore.min_ratio < 1.0:
        raise ConfigError(f"welore.min_ratio={c.welore.min_ratio} must be in [0, 1)")
    import re

    try:
        re.compile(c.analysis.paths)
    except re.error as e:
        raise ConfigError(f"analysis.paths={c.analysis.paths!r} is not a regex: {e}") from None
    cfg = finetuning.model_config(c)
    smallest = min(cfg.hidden_size, cfg.intermediate_size)
    for key, value in (("analysis.rank", c.analysis.rank), ("galore.rank", c.galore.rank),
                       ("lora.rank", c.lora.rank), ("finetune.intruder_k", c.finetune.intruder_k),
                       *(("finetune.lora_ranks[...]", r) for r in c.finetune.lora_ranks)):
        if value > smallest:
            raise ConfigError(f"{key}={value} exceeds the smallest matrix dimension {smallest} "
                              "of the model")
    if c.data.seq_len > cfg.max_len:
        raise ConfigError(f"data.seq_len={c.data.seq_len} exceeds the model's max_len "
                          f"{cfg.max_len}")


# --------------------------------------------------------------------------------------- helpers
def _matrix_label(path: str) -> str:
    """'layers_3/attn/q/kernel' -> 'L3 attn.q'."""
    parts = path.split("/")
    layer = parts[0].replace("layers_", "L") if parts[0].startswith("layers_") else parts[0]
    return f"{layer} {'.'.join(p for p in parts[1:] if p != 'kernel')}"


class _Setup:
    """Data, model and loss functions shared by all runs."""

    def __init__(self, c: ml_collections.ConfigDict):
        self.c = c
        held_out = (*c.data.val_plays, c.data.finetune_play)
        self.pretrain_tokens = text.load_shakespeare(held_out).train
        self.pretrain_val = text.load_shakespeare(tuple(c.data.val_plays)).val
        play = text.load_shakespeare((c.data.finetune_play,)).val
        cut = int(round(play.size * (1.0 - c.data.finetune_val_fraction)))
        self.finetune_tokens, self.finetune_val = play[:cut], play[cut:]
        self.seq_len = c.data.seq_len
        cfg = finetuning.model_config(c)
        self.model_config = cfg
        self.model = Llama(cfg)
        self.mesh = sharding.make_mesh(0, 1)
        dp = sharding.data_parallel_size(self.mesh)
        model = self.model

        def windows(tokens):
            w = text.eval_windows(tokens, self.seq_len, c.data.eval_windows)
            w = w[: max(dp, len(w) // dp * dp)]
            return [w[i:i + 16] for i in range(0, len(w), 16) if len(w[i:i + 16]) % dp == 0]

        self.eval_pretrain = windows(self.pretrain_val)
        self.eval_finetune = windows(self.finetune_val)

        def dense_loss(params, batch):
            logits = model.apply({"params": params}, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        self.dense_loss = dense_loss
        self.init_params = jax.jit(lambda k: model.init(
            k, jnp.zeros((1, self.seq_len), jnp.int32))["params"])(jax.random.key(c.seed))
        self._dense_eval = jax.jit(dense_loss)
        self._analysis = None
        self.np = np

    def analysis_functions(self, a: ml_collections.ConfigDict):
        """``(analyse, overlap, groups)``, compiled once and shared by every run: ``analyse(dense
        params, batch)`` gives the gradient metrics, the weight metrics and, per group of
        equal-shaped matrices, the stacked top-r gradient subspaces; ``overlap(before, now)`` the
        per-matrix subspace overlaps of a group."""
        if self._analysis is not None:
            return self._analysis
        import re

        import jax
        import jax.numpy as jnp

        from lrx.analysis import layer_metrics, singular_subspace, subspace_overlap

        paths = _matrix_paths(self.init_params, a.paths)
        pattern = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
        flat0 = _flat(self.init_params)
        shapes = {p: flat0[p].shape for p in paths}
        groups = [[p for p in paths if shapes[p] == s] for s in dict.fromkeys(shapes.values())]
        dense_loss = self.dense_loss

        def analyse(dense, batch):
            grads = jax.grad(dense_loss)(dense, batch)
            g = layer_metrics(grads, ("effective_rank", "top_r_energy"), pattern, rank=a.rank)
            w = layer_metrics(dense, ("stable_rank",), pattern)
            flat = _flat(grads)
            subspaces = [singular_subspace(jnp.stack([flat[p] for p in group]), a.rank)
                         for group in groups]   # one batched SVD per matrix shape
            return g, w, subspaces

        overlap = jax.jit(lambda p, q: subspace_overlap(p, q, orthonormal=True))
        self._analysis = (jax.jit(analyse), overlap, groups)
        return self._analysis

    def eval_dense(self, params, batches) -> float:
        """Mean loss of dense ``params`` over ``batches``."""
        return float(self.np.mean([float(self._dense_eval(params, b)) for b in batches]))

    def batch_fn(self, tokens, batch_size: int):
        seed, seq_len = self.c.data.seed, self.seq_len
        return lambda step: text.sample_batch(tokens, seed, step, batch_size, seq_len)


def _projectors(opt_state) -> dict[str, Any]:
    """``{path: (B, d, r) basis}`` of the projectors of an lrx.optim low-rank state
    (:func:`lrx.optim.projectors`, one ``Projector(left, right)`` per projected leaf); ``{}``
    when the optimizer keeps none."""
    import jax

    import lrx.optim
    from lrx.paths import path_str

    try:
        tree = lrx.optim.projectors(opt_state)
    except ValueError:  # no low-rank state (e.g. AdamW)
        return {}
    leaves = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, lrx.optim.Projector))[0]
    return {path_str(p): (x.left if x.left is not None else x.right)
            for p, x in leaves if isinstance(x, lrx.optim.Projector)}


def _analysis_hook(setup: _Setup, to_dense, a: ml_collections.ConfigDict,
                   projector_gap: int = 0):
    """Hook ``(step, state, batch) -> (state, metrics)``: spectra of the dense-weight gradient and
    of the dense weight every ``a.every`` steps (and after the first step); with
    ``projector_gap`` (GaLore), also the overlap between the optimizer's projectors before and
    after each refresh (``galore_overlap/<path>``)."""
    import jax
    import numpy as np

    analyse, overlap, groups = setup.analysis_functions(a)
    dense_of = to_dense if to_dense is _identity else jax.jit(to_dense)
    previous: list[Any] = []
    previous_projectors: dict[str, Any] = {}

    def hook(step, state, batch):
        out = {}
        # The optimizer refreshes during the step whose count (= step - 1) is a multiple of gap.
        if projector_gap and (step - 1) % projector_gap == 0:
            # Host copies: the loop donates the state's buffers to the next step.
            now = {k: np.array(v) for k, v in _projectors(state.opt_state).items()}
            for path, basis in now.items():
                if path in previous_projectors:
                    value = np.asarray(overlap(previous_projectors[path], basis))
                    out[f"galore_overlap/{path}"] = float(np.mean(value))
            previous_projectors.update(now)
        if step % a.every and step != 1:
            return state, out or None
        g, w, subspaces = analyse(dense_of(state.params, state.frozen), batch[0])
        out.update({f"grad/{k}": float(v) for k, v in g.items()})
        out.update({f"weight/{k}": float(v) for k, v in w.items()})
        if previous:
            for group, before, now in zip(groups, previous, subspaces):
                values = np.asarray(overlap(before, now))
                out.update({f"overlap/{p}": float(values[i]) for i, p in enumerate(group)})
        previous[:] = subspaces
        return state, {k: v for k, v in out.items() if np.isfinite(v)}

    return hook


def _method_pieces(setup: _Setup, method: str, params, *, learning_rate: float, steps: int,
                   warmup: int, min_ratio: float, grad_clip: float, lora_rank: int = 0,
                   lora_alpha: float = 0.0, key=None, train_dense: bool = True):
    """(trainable, frozen, optimizer, loss_fn, eval_fn, to_dense, schedule, trainable count) for
    a method, from the LM builder's pieces (:func:`experiments.lm.optimizer_transform`,
    :func:`~experiments.lm.parameterize`, :func:`~experiments.lm.loss_functions`).
    ``train_dense=False`` (LoRA fine-tuning) trains the adapters only: the dense leaves
    (embedding, norms, LM head) get zero updates and no optimizer state."""
    c = setup.c
    if method not in METHODS:  # pragma: no cover - validated
        raise ConfigError(f"unknown method {method!r}; valid choices: {METHODS}")
    o = lm.optimizer_defaults("adamw" if method == "lora" else method)
    o.update(learning_rate=learning_rate, warmup_steps=warmup, min_lr_ratio=min_ratio,
             grad_clip=0.0)
    if method == "galore":
        o.update(rank=c.galore.rank, update_proj_gap=c.galore.update_proj_gap,
                 scale=c.galore.scale, proj_type=c.galore.proj_type, project=c.analysis.paths)
    schedule = _schedule(learning_rate, warmup, steps, min_ratio)
    section = lm.defaults().param
    section.update(method="lora" if method == "lora" else "none", include=c.analysis.paths,
                   rank=lora_rank or section.rank, alpha=float(lora_alpha))
    params, frozen = lm.parameterize(params, section,
                                     key if key is not None else jax.random.key(c.seed + 1))
    mask = lrx.optim.path_mask(params, o.project) if method == "galore" else None
    opt = lm.optimizer_transform(o, schedule, mask)
    trainable = None
    if method == "lora" and not train_dense:
        dense_paths = set(_flat(params)) & set(_flat(setup.init_params))
        labels = jax.tree_util.tree_map_with_path(
            lambda p, x: "freeze" if path_str(p) in dense_paths else "train", params)
        opt = optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()}, labels)
        trainable = sum(x.size for k, x in _flat(params).items() if k not in dense_paths)
    if grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(grad_clip), opt)
    to_dense = _materialize if method == "lora" else _identity
    loss_fn, eval_fn = lm.loss_functions(setup.model, section)
    if trainable is None:
        trainable = sum(x.size for x in jax.tree_util.tree_leaves(params))
    return params, frozen, opt, loss_fn, eval_fn, to_dense, schedule, int(trainable)


def _identity(params, frozen):  # noqa: ARG001 - dense methods: the trainable params are W
    return params


def _materialize(params, frozen):
    """The dense weights of a LoRA model (W0 + s a b per matrix)."""
    return lrx.param.materialize(lrx.param.combine(params, frozen))


# ------------------------------------------------------------------------------------------- run
def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the three parts and writes tables, plots and the summary."""
    wall0 = time.perf_counter()
    c = finetuning.merged(config, defaults)
    setup = _Setup(c)
    summary: dict[str, Any] = {"experiment": "spectra"}

    # Part 1: pretraining with spectral hooks.
    finals: dict[str, Any] = {}
    records: dict[str, list[dict]] = {}
    pretrain_rows = []
    for method in c.pretrain.methods:
        lr = c.pretrain[f"{method}_learning_rate"]
        p, fz, opt, loss_fn, eval_fn, to_dense, schedule, n_train = _method_pieces(
            setup, method, setup.init_params, learning_rate=lr, steps=c.pretrain.steps,
            warmup=c.pretrain.warmup_steps, min_ratio=c.pretrain.min_lr_ratio,
            grad_clip=c.pretrain.grad_clip, lora_rank=c.lora.rank, lora_alpha=c.lora.alpha)
        sub = os.path.join(workdir, f"pretrain_{method}")
        gap = c.galore.update_proj_gap if method == "galore" else 0
        hooks = [_analysis_hook(setup, to_dense, c.analysis, gap)] if c.analysis.every else []
        log.info("part 1: pretraining with %s for %d steps", method, c.pretrain.steps)
        result = _train(setup, sub, params=p, frozen=fz, optimizer=opt, loss_fn=loss_fn,
                        tokens=setup.pretrain_tokens, batch_size=c.pretrain.batch_size,
                        steps=c.pretrain.steps, schedule=schedule, eval_fn=eval_fn,
                        eval_batches=setup.eval_pretrain, eval_every=c.pretrain.eval_every,
                        log_every=c.pretrain.log_every, hooks=hooks)
        state = result["state"]
        dense = jax.device_get(to_dense(state.params, state.frozen))
        finals[method] = dense
        records[method] = loop.read_metrics(sub)
        row = {"method": method, "learning rate": lr,
               "trainable params": n_train,
               "eval loss": setup.eval_dense(dense, setup.eval_pretrain)}
        row.update(_trajectory_summary(records[method]))
        pretrain_rows.append(row)
    summary["pretrain"] = pretrain_rows
    if pretrain_rows:
        common.write_table(workdir, "pretrain", pretrain_rows,
                           title="Part 1: pretraining spectra (means over attention/MLP matrices;"
                                 " first -> last analysis step)")
        _heatmaps(workdir, records, c)

    # Part 2: fine-tuning on the held-out play, full vs LoRA; intruder dimensions.
    if c.finetune.enabled and "adamw" in finals:
        summary["finetune"] = _finetune(setup, workdir, finals["adamw"])
    # Part 3: WeLore on the AdamW-pretrained model.
    if c.welore.enabled and "adamw" in finals:
        summary["welore"] = _welore(setup, workdir, finals["adamw"], records.get("adamw", []))

    summary["wall_seconds"] = time.perf_counter() - wall0
    summary["model_params"] = int(sum(x.size for x in jax.tree_util.tree_leaves(
        setup.init_params)))
    common.write_summary(workdir, summary)
    return {k: summary[k] for k in ("pretrain", "wall_seconds")
            } | {k: summary[k]["headline"] for k in ("finetune", "welore") if k in summary}


def _series(records: list[dict], prefix: str, metric: str | None) -> dict[str, dict[int, float]]:
    """``{matrix path: {step: value}}`` for keys ``prefix/path[/metric]`` of metrics.jsonl."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        for key, value in r.items():
            if not key.startswith(prefix + "/"):
                continue
            rest = key[len(prefix) + 1:]
            if metric is not None:
                if not rest.endswith("/" + metric):
                    continue
                rest = rest[: -len(metric) - 1]
            out.setdefault(rest, {})[r["step"]] = value
    return out


_SERIES = {
    "grad_effective_rank": ("grad", "effective_rank"),
    "grad_top_r_energy": ("grad", "top_r_energy"),
    "weight_stable_rank": ("weight", "stable_rank"),
    "projector_overlap": ("overlap", None),
    "galore_projector_overlap": ("galore_overlap", None),
}


def _trajectory_summary(records: list[dict]) -> dict[str, float]:
    import numpy as np

    row = {}
    for name, (prefix, metric) in _SERIES.items():
        series = _series(records, prefix, metric)
        if not series:
            continue
        steps = sorted({s for v in series.values() for s in v})
        first = np.mean([v[steps[0]] for v in series.values() if steps[0] in v])
        last = np.mean([v[steps[-1]] for v in series.values() if steps[-1] in v])
        row[f"{name} first"] = float(first)
        row[f"{name} last"] = float(last)
    return row


def _heatmaps(workdir: str, records: dict[str, list[dict]], c) -> None:
    import numpy as np

    plt = common.pyplot()
    methods = [m for m in records if _series(records[m], "grad", "effective_rank")]
    if not methods:
        return
    for name, (prefix, metric) in _SERIES.items():
        with_data = [m for m in methods if _series(records[m], prefix, metric)]
        if not with_data:
            continue
        fig, axes = plt.subplots(1, len(with_data), figsize=(4.2 * len(with_data) + 1.5, 7.5),
                                 squeeze=False)
        grids = []
        for method in with_data:
            series = _series(records[method], prefix, metric)
            paths = sorted(series, key=_sort_key)
            steps = sorted({s for v in series.values() for s in v})
            grid = np.full((len(paths), len(steps)), np.nan)
            for i, p in enumerate(paths):
                for j, s in enumerate(steps):
                    grid[i, j] = series[p].get(s, np.nan)
            grids.append((method, paths, steps, grid))
        finite = [g[3][np.isfinite(g[3])] for g in grids if np.isfinite(g[3]).any()]
        vmin = min(float(f.min()) for f in finite) if finite else 0.0
        vmax = max(float(f.max()) for f in finite) if finite else 1.0
        for ax, (method, paths, steps, grid) in zip(axes[0], grids):
            image = ax.imshow(grid, aspect="auto", interpolation="nearest", vmin=vmin, vmax=vmax,
                              cmap="viridis")
            ax.set_title(method)
            ax.set_xlabel("step")
            ticks = list(range(0, len(steps), max(1, len(steps) // 6)))
            ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
            ax.set_yticks(range(len(paths)), [_matrix_label(p) for p in paths], fontsize=5)
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
        suffix = {"grad_top_r_energy": f" (r={c.analysis.rank})",
                  "projector_overlap": f" (r={c.analysis.rank})",
                  "galore_projector_overlap": f" (r={c.galore.rank}, gap "
                                              f"{c.galore.update_proj_gap})"}.get(name, "")
        fig.suptitle(HEATMAPS[name] + suffix)
        common.savefig(fig, workdir, f"heatmap_{name}")


def _sort_key(path: str):
    parts = path.split("/")
    layer = int(parts[0].split("_")[1]) if parts[0].startswith("layers_") else -1
    return (layer, path)


def _finetune(setup: _Setup, workdir: str, base) -> dict:
    c, f = setup.c, setup.c.finetune
    paths = _matrix_paths(base, c.analysis.paths)
    before_pt = setup.eval_dense(base, setup.eval_pretrain)
    before_ft = setup.eval_dense(base, setup.eval_finetune)
    runs = ([("full", 0)] if "full" in f.methods else []) + (
        [("lora", r) for r in f.lora_ranks] if "lora" in f.methods else [])
    rows, curves = [], {}
    for method, rank in runs:
        name = "full" if method == "full" else f"lora_r{rank}"
        p, fz, opt, loss_fn, eval_fn, to_dense, schedule, n_train = _method_pieces(
            setup, "adamw" if method == "full" else "lora", base, train_dense=False,
            learning_rate=f.learning_rate if method == "full" else f.lora_learning_rate,
            steps=f.steps, warmup=f.warmup_steps, min_ratio=1.0, grad_clip=1.0,
            lora_rank=rank, lora_alpha=f.lora_alpha_ratio * rank,
            key=jax.random.key(c.seed + 100 + rank))
        log.info("part 2: fine-tuning (%s) on %s for %d steps", name, c.data.finetune_play,
                 f.steps)
        result = _train(setup, os.path.join(workdir, f"finetune_{name}"), params=p, frozen=fz,
                        optimizer=opt, loss_fn=loss_fn, tokens=setup.finetune_tokens,
                        batch_size=f.batch_size, steps=f.steps, schedule=schedule,
                        eval_fn=eval_fn, eval_batches=setup.eval_finetune,
                        eval_every=f.eval_every, log_every=max(1, f.eval_every // 2))
        state = result["state"]
        tuned = jax.device_get(to_dense(state.params, state.frozen))
        row = {"method": name, "trainable params": n_train,
               "finetune-play loss": setup.eval_dense(tuned, setup.eval_finetune),
               "pretrain-dist loss": setup.eval_dense(tuned, setup.eval_pretrain)}
        row["pretrain-dist loss change"] = row["pretrain-dist loss"] - before_pt
        # Output-space vectors (experiments.finetuning.update_spectra): right singular vectors of
        # the Flax (in, out) kernel, as the paper's left singular vectors of the torch weight.
        counts = update_spectra(base, tuned, paths, k=f.intruder_k,
                                thresholds=f.intruder_thresholds)["intruders"]
        for eps in f.intruder_thresholds:
            row[f"intruders eps={eps}"] = counts[eps]
        rows.append(row)
        curves[name] = counts
    common.write_table(
        workdir, "finetune", rows,
        title=f"Part 2: fine-tuning on {c.data.finetune_play} ({f.steps} steps) from the AdamW "
              f"model (before: finetune-play loss {before_ft:.4f}, pretrain-dist loss "
              f"{before_pt:.4f}); intruder dimensions summed over {len(paths)} matrices, top "
              f"k={f.intruder_k}")
    if curves:
        plt = common.pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for name, counts in curves.items():
            axes[0].plot(list(counts), list(counts.values()), "o-", label=name)
        axes[0].set_xlabel("epsilon (cosine threshold)")
        axes[0].set_ylabel(f"intruder dimensions (sum over {len(paths)} matrices)")
        axes[0].legend()
        for row in rows:
            axes[1].scatter(row["finetune-play loss"], row["pretrain-dist loss"])
            axes[1].annotate(row["method"], (row["finetune-play loss"],
                                             row["pretrain-dist loss"]), fontsize=8)
        axes[1].scatter([before_ft], [before_pt], marker="x", color="k")
        axes[1].annotate("pretrained", (before_ft, before_pt), fontsize=8)
        axes[1].set_xlabel("fine-tuning play loss")
        axes[1].set_ylabel("pretraining-distribution loss")
        common.savefig(fig, workdir, "intruders")
    main_eps = f.intruder_thresholds[len(f.intruder_thresholds) // 2]
    headline = {r["method"]: {"intruders": r[f"intruders eps={main_eps}"],
                              "finetune_loss": r["finetune-play loss"],
                              "pretrain_loss": r["pretrain-dist loss"]} for r in rows}
    return {"rows": rows, "before": {"finetune_loss": before_ft, "pretrain_loss": before_pt},
            "headline": {"epsilon": main_eps, **headline}, "matrices": len(paths)}


def _welore(setup: _Setup, workdir: str, base, adamw_records: list[dict]) -> dict:
    import jax
    import numpy as np
    from scipy.stats import spearmanr

    from lrx.analysis import (
        singular_values,
        truncate_rank,
        uniform_kept_ranks,
        welore_classify,
        welore_kept_ranks,
    )

    c = setup.c
    paths = _matrix_paths(base, c.analysis.paths)
    flat = _flat(base)
    spectra = _per_shape(jax.jit(singular_values), flat, paths)
    dense_loss = setup.eval_dense(base, setup.eval_pretrain)
    truncate = jax.jit(truncate_rank)
    grad_rank = _series(adamw_records, "grad", "effective_rank")
    late = {}
    for p in paths:
        values = [v for s, v in sorted(grad_rank.get(p, {}).items())]
        if values:
            tail = values[-max(1, len(values) // 3):]
            late[p] = float(np.mean(tail)) / min(flat[p].shape)
    rows = {p: {"matrix": _matrix_label(p), "rank": min(flat[p].shape)} for p in paths}
    results = []
    for target in c.welore.targets:
        split = welore_classify(spectra, target, min_ratio=c.welore.min_ratio)
        for p in paths:
            rows[p][f"ratio @{target}"] = split[p]["ratio"]
            rows[p][f"LRC @{target}"] = "LRC" if split[p]["lrc"] else "N-LRC"
        # WeLore compression (LRCs truncated, N-LRCs unchanged) vs uniform at the same budget.
        kept, uniform_fraction = welore_kept_ranks({p: split[p] for p in paths})
        uniform = uniform_kept_ranks({p: split[p]["rank"] for p in paths}, uniform_fraction)
        welore_params = _replace(base, _per_shape(truncate, flat, paths, kept))
        uniform_params = _replace(base, _per_shape(truncate, flat, paths, uniform))
        ratios = [split[p]["ratio"] for p in paths if p in late]
        rho = (float(spearmanr(ratios, [late[p] for p in paths if p in late]).statistic)
               if len(ratios) > 2 else math.nan)
        results.append({
            "target reduction": target, "threshold": split[paths[0]]["threshold"],
            "LRCs": sum(split[p]["lrc"] for p in paths), "matrices": len(paths),
            "rank dropped (LRCs only)": uniform_fraction,
            "dense loss": dense_loss,
            "WeLore loss": setup.eval_dense(welore_params, setup.eval_pretrain),
            "uniform loss": setup.eval_dense(uniform_params, setup.eval_pretrain),
            "spearman(ratio, late grad erank/r)": rho})
    table_rows = [rows[p] for p in sorted(paths, key=_sort_key)]
    text = common.markdown_table(results)
    text += "\n\n" + common.markdown_table(table_rows)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "welore.md"), "w") as fh:
        fh.write(f"## Part 3: WeLore rank reduction of the AdamW-pretrained model (min_ratio "
                 f"{c.welore.min_ratio}; loss = pretraining-distribution eval loss)\n\n{text}\n")
    _welore_plot(workdir, rows, paths, c.welore.targets[-1])
    return {"summary": results, "per_matrix": table_rows,
            "headline": {f"@{r['target reduction']}": {
                k: r[k] for k in ("LRCs", "rank dropped (LRCs only)", "dense loss",
                                  "WeLore loss", "uniform loss",
                                  "spearman(ratio, late grad erank/r)")} for r in results}}


def _replace(tree, new_leaves: dict[str, Any]):
    import jax

    from lrx.analysis.spectra import path_str

    return jax.tree_util.tree_map_with_path(
        lambda p, x: new_leaves.get(path_str(p), x), tree)


def _welore_plot(workdir: str, rows: dict, paths: list[str], target: float) -> None:
    import numpy as np

    plt = common.pyplot()
    layers = sorted({_sort_key(p)[0] for p in paths})
    kinds = sorted({"/".join(p.split("/")[1:-1]) for p in paths})
    grid = np.full((len(layers), len(kinds)), np.nan)
    for p in paths:
        i = layers.index(_sort_key(p)[0])
        j = kinds.index("/".join(p.split("/")[1:-1]))
        grid[i, j] = rows[p][f"ratio @{target}"]
    fig, ax = plt.subplots(figsize=(6, 4))
    image = ax.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_xticks(range(len(kinds)), [k.replace("/", ".") for k in kinds], rotation=30)
    ax.set_yticks(range(len(layers)), [f"layer {i}" for i in layers])
    ax.set_title(f"WeLore rank-reduction ratio (target {target:.0%})")
    fig.colorbar(image, ax=ax)
    common.savefig(fig, workdir, "welore")


# ------------------------------------------------------------------------------------- variants
def _smoke(c: ml_collections.ConfigDict) -> None:
    c.model.hidden_size, c.model.intermediate_size = 16, 32
    c.model.num_heads, c.model.num_layers = 2, 1
    c.data.seq_len, c.data.eval_windows = 32, 4
    c.pretrain.steps, c.pretrain.batch_size, c.pretrain.log_every = 3, 4, 1
    c.pretrain.warmup_steps, c.pretrain.eval_every = 1, 0
    c.pretrain.methods = ("adamw", "galore")  # LoRA runs below, in the fine-tuning part
    c.galore.rank, c.galore.update_proj_gap = 4, 2
    c.lora.rank, c.lora.alpha = 4, 8.0
    c.analysis.every, c.analysis.rank = 2, 4
    c.finetune.steps, c.finetune.batch_size, c.finetune.eval_every = 2, 4, 0
    c.finetune.warmup_steps, c.finetune.lora_ranks = 1, (2,)
    c.finetune.methods = ("lora",)        # full fine-tuning runs the same code path as AdamW
    c.finetune.intruder_k = 4
    c.welore.targets = (0.5,)


def _quick(c: ml_collections.ConfigDict) -> None:
    """About 3 minutes on 2 cores: fewer steps, same model."""
    c.pretrain.steps, c.pretrain.eval_every = 150, 50
    c.analysis.every = 15
    c.finetune.steps, c.finetune.eval_every = 60, 30


def _small(c: ml_collections.ConfigDict) -> None:
    """A 4-layer, 64-wide model on 64-byte windows: about 12x less compute per step than the
    default; for a loaded or slow machine."""
    c.model.hidden_size, c.model.intermediate_size = 64, 176
    c.model.num_heads, c.model.num_layers = 4, 4
    c.data.seq_len = 64
    c.pretrain.steps, c.pretrain.eval_every = 300, 100
    c.galore.rank, c.lora.rank, c.lora.alpha = 16, 16, 32.0
    c.analysis.every, c.analysis.rank = 20, 4
    c.finetune.steps, c.finetune.eval_every = 100, 50


VARIANTS = {"smoke": _smoke, "quick": _quick, "small": _small}
