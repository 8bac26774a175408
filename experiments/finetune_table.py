"""Fine-tuning table: parameter-efficient fine-tuning methods of lrx.param under a domain shift.

The tiny LLaMA is pre-trained with AdamW on Shakespeare's comedies, histories and the other
non-tragedies (the checkpoint is cached in the workdir and reused), then fine-tuned on the
tragedies by each method, all attention and MLP matrices adapted, embeddings / norms / LM head
frozen (trained by full fine-tuning only). Per method: target eval loss (held-out tragedy text),
forgetting (eval loss on held-out non-tragedy plays minus its value before fine-tuning),
trainable parameters, optimizer-state bytes, intruder dimensions of the tuned matrices ("LoRA vs
Full Fine-tuning: An Illusion of Equivalence", arXiv 2410.21228), the RankMe effective rank of
``Delta W`` (arXiv 2210.02157) and wall time.

Methods (lrx.param; papers in :mod:`lrx.param.nodes` and :mod:`lrx.param.methods`): full
fine-tuning, LoRA (arXiv 2106.09685), rsLoRA (2312.03732), PiSSA (2404.02948), OLoRA
(2406.01775), LoRA-GA (2407.05000), LoRA-SB (2411.19557), EVA (2410.07170), DoRA (2402.09353),
VeRA (2310.11454), RandLoRA (2502.00987), NOLA (2310.02556), SoRA (2311.11696), DyLoRA
(2210.07558; one run, evaluated at each nested rank) and WeLore-LRC (2407.11239). Budgets are
matched by rank (``rank`` for every rank-based method; the parameter counts differ and are
reported); LoRA-GA, LoRA-SB and EVA estimate their gradients / activations on
``stats_batches`` fine-tuning batches before training.

Outputs: ``finetune_table.md``, ``finetune_table.png`` (target loss vs forgetting),
``summary.json``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ml_collections

from experiments import common, finetuning, lm
from experiments.common import ConfigError
from lrx.paths import ATTN_MLP

METHODS = ("full", "lora", "rslora", "pissa", "olora", "lora_ga", "lora_sb", "eva", "dora",
           "vera", "randlora", "nola", "sora", "dylora", "welore_lrc")
MATRICES = ATTN_MLP  # the attention and MLP matrices (lrx.paths.ATTN_MLP)
# What each paper claims (reference notes, /work/shared/reference/parameterizations.md; [recalled]
# entries are from the papers, not re-verified).
CLAIMS = {
    "full": "reference; most forgetting, intruder-free (arXiv 2410.21228)",
    "lora": "close to full FT at a fraction of the parameters; intruder dimensions appear",
    "rslora": "alpha/sqrt(r) keeps higher ranks learning (peft bench: 0.513 vs 0.474 GSM8K)",
    "pissa": "faster convergence than LoRA from the principal components [recalled]",
    "olora": "faster convergence via orthonormal QR init [recalled]",
    "lora_ga": "2-4x faster convergence by aligning with the full gradient (peft docs)",
    "lora_sb": "r^2 parameters match LoRA by approximating the first full update [recalled]",
    "eva": "activation-driven init + rank redistribution beats LoRA [recalled]",
    "dora": "closes part of the gap to full FT (magnitude/direction split)",
    "vera": "~10x fewer parameters than LoRA at similar quality [recalled]; peft bench lower",
    "randlora": "full-rank update, reduces the LoRA-full FT gap (paper); peft bench = LoRA",
    "nola": "LoRA quality with far fewer parameters (GPT-2 E2E)",
    "sora": "learns a sparse rank; matches LoRA with fewer effective ranks [recalled]",
    "dylora": "one run serves every rank <= r_max, 7x faster than a rank sweep (peft #289)",
    "welore_lrc": "fine-tuning only the low-rank components matches full FT [recalled]",
}
log = logging.getLogger("lrx.finetune_table")


def defaults() -> ml_collections.ConfigDict:
    """The config schema with CPU defaults (target: <= 15 minutes on 2 cores)."""
    c = ml_collections.ConfigDict()
    c.experiment = "finetune_table"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny", hidden_size=64, intermediate_size=176, num_heads=4, num_layers=4))
    c.data = ml_collections.ConfigDict(dict(
        target_genre="tragedies",                           # the fine-tuning domain
        source_val_plays=("twelfth-night", "richard-ii"),   # held-out pre-training domain
        target_val_fraction=0.1, seq_len=64, seed=0, eval_windows=64))
    c.pretrain = ml_collections.ConfigDict(dict(
        steps=600, batch_size=16, learning_rate=3e-3, warmup_steps=50, min_lr_ratio=0.1))
    c.finetune = ml_collections.ConfigDict(dict(
        methods=METHODS, steps=120, batch_size=16, warmup_steps=10, grad_clip=1.0,
        full_learning_rate=1e-3, learning_rate=5e-3, random_basis_learning_rate=2e-2,
        rank=8, nola_bases=256, vera_rank=64, sora_threshold=1e-4, dylora_ranks=(1, 4, 8),
        welore_reduction=0.5, stats_batches=4, eval_every=0))
    c.analysis = ml_collections.ConfigDict(dict(
        paths=MATRICES, intruder_k=10, intruder_thresholds=(0.3, 0.5, 0.7)))
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Unknown keys, wrong types and impossible values, before any work."""
    common.check_keys(config, defaults())
    c = finetuning.merged(config, defaults)
    from lrx.data.text import _GENRES, shakespeare_plays

    common.check_choice(c.data.target_genre, list(_GENRES), "data.target_genre")
    plays = shakespeare_plays()
    for play in c.data.source_val_plays:
        common.check_choice(play, list(plays), "data.source_val_plays[...]")
        if plays[play].startswith(c.data.target_genre + "/"):
            raise ConfigError(f"data.source_val_plays: {play!r} belongs to the target genre "
                              f"{c.data.target_genre!r}")
    if not c.finetune.methods:
        raise ConfigError(f"finetune.methods is empty; valid choices: {', '.join(METHODS)}")
    for m in c.finetune.methods:
        common.check_choice(m, METHODS, "finetune.methods[...]")
    for key in ("pretrain.steps", "pretrain.batch_size", "pretrain.learning_rate",
                "finetune.steps", "finetune.batch_size", "finetune.full_learning_rate",
                "finetune.learning_rate", "finetune.random_basis_learning_rate",
                "finetune.rank", "finetune.nola_bases", "finetune.vera_rank",
                "finetune.stats_batches", "data.seq_len", "data.eval_windows",
                "analysis.intruder_k"):
        section, leaf = key.split(".")
        common.check_positive(c[section][leaf], key)
    cfg = finetuning.model_config(c)
    smallest = min(cfg.hidden_size, cfg.intermediate_size)
    if 2 * c.finetune.rank > smallest:
        raise ConfigError(f"finetune.rank={c.finetune.rank}: LoRA-GA needs 2 * rank <= the "
                          f"smallest matrix dimension {smallest}")
    for r in c.finetune.dylora_ranks:
        if not 1 <= r <= c.finetune.rank:
            raise ConfigError(f"finetune.dylora_ranks[...]={r} must be in 1..finetune.rank")
    if not 0 < c.finetune.welore_reduction < 1:
        raise ConfigError("finetune.welore_reduction must be in (0, 1)")
    if c.data.seq_len > cfg.max_len:
        raise ConfigError(f"data.seq_len={c.data.seq_len} exceeds max_len {cfg.max_len}")


class _Setup:
    """Data, model and losses shared by the runs (the interface of ``finetuning.train``)."""

    def __init__(self, c: ml_collections.ConfigDict):
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax

        from lrx.data import text
        from lrx.models.llama import Llama
        from lrx.train import sharding

        self.c = c
        plays = text.shakespeare_plays()
        target = [k for k, v in plays.items() if v.startswith(c.data.target_genre + "/")]
        held = (*c.data.source_val_plays, *target)
        self.source_tokens = text.load_shakespeare(held).train
        self.source_val = text.load_shakespeare(tuple(c.data.source_val_plays)).val
        tgt = text.load_shakespeare(tuple(target)).val
        cut = int(round(tgt.size * (1.0 - c.data.target_val_fraction)))
        self.target_tokens, self.target_val = tgt[:cut], tgt[cut:]
        self.seq_len = c.data.seq_len
        self.model = Llama(finetuning.model_config(c))
        self.mesh = sharding.make_mesh(0, 1)
        dp = sharding.data_parallel_size(self.mesh)
        model = self.model

        def windows(tokens):
            w = text.eval_windows(tokens, self.seq_len, c.data.eval_windows)
            w = w[: max(dp, len(w) // dp * dp)]
            return [w[i:i + 16] for i in range(0, len(w), 16) if len(w[i:i + 16]) % dp == 0]

        self.eval_source, self.eval_target = windows(self.source_val), windows(self.target_val)

        def dense_loss(params, batch):
            logits = model.apply({"params": params}, batch[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

        self.dense_loss = dense_loss
        self.init_params = jax.jit(lambda k: model.init(
            k, jnp.zeros((1, self.seq_len), jnp.int32))["params"])(jax.random.key(c.seed))
        self._eval = jax.jit(dense_loss)
        self.np = np

    def eval_dense(self, params, batches) -> float:
        return float(self.np.mean([float(self._eval(params, b)) for b in batches]))

    def batch_fn(self, tokens, batch_size: int):
        from lrx.data import text

        seed, seq_len = self.c.data.seed, self.seq_len
        return lambda step: text.sample_batch(tokens, seed, step, batch_size, seq_len)


def _adamw_section(grad_clip: float) -> ml_collections.ConfigDict:
    """The LM builder's AdamW section as this study uses it: betas (0.9, 0.999), eps 1e-6, no
    weight decay (the learning rate comes from the study's own schedule)."""
    o = lm.optimizer_defaults("adamw")
    o.update(b1=0.9, b2=0.999, eps=1e-6, weight_decay=0.0, grad_clip=grad_clip)
    return o


def _pretrained(setup: _Setup, workdir: str) -> Any:
    """The AdamW-pretrained params, cached as ``pretrained.msgpack`` in the workdir."""
    import jax
    from flax import serialization

    c = setup.c
    path = os.path.join(workdir, "pretrained.msgpack")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return serialization.from_bytes(jax.device_get(setup.init_params), f.read())
    p = c.pretrain
    sched = finetuning.schedule(p.learning_rate, p.warmup_steps, p.steps, p.min_lr_ratio)
    opt = lm.optimizer_transform(_adamw_section(grad_clip=1.0), sched, mask=None)
    def loss_fn(params, fz, batch, rng):  # noqa: ARG001
        return setup.dense_loss(params, batch), {}

    log.info("pre-training on the non-%s plays for %d steps", c.data.target_genre, p.steps)
    result = finetuning.train(
        setup, os.path.join(workdir, "pretrain"), params=setup.init_params, frozen={},
        optimizer=opt, loss_fn=loss_fn, tokens=setup.source_tokens, batch_size=p.batch_size,
        steps=p.steps, schedule=sched, eval_fn=None, eval_batches=(), eval_every=0,
        log_every=max(1, p.steps // 10))
    params = jax.device_get(result["state"].params)
    with open(path, "wb") as f:
        f.write(serialization.to_bytes(params))
    return params


def _stats(setup: _Setup, base: Any, paths: list[str], kind: str) -> dict[str, Any]:
    """``{path: stat}`` on ``stats_batches`` fine-tuning batches: the summed loss gradient
    (``'gradient'``) or the stacked layer inputs ``(tokens, m)`` (``'activations'``)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from lrx.models.llama import Linear

    c = setup.c
    batches = [setup.batch_fn(setup.target_tokens, c.finetune.batch_size)(10_000 + i)
               for i in range(c.finetune.stats_batches)]
    if kind == "gradient":
        grad = jax.jit(jax.grad(setup.dense_loss))
        total = None
        for b in batches:
            g = finetuning.flat(grad(base, jnp.asarray(b)))
            total = g if total is None else {k: total[k] + g[k] for k in total}
        return {p: total[p] for p in paths}
    seen: dict[str, list[Any]] = {p: [] for p in paths}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            path = "/".join(context.module.path) + "/kernel"
            if path in seen:
                seen[path].append(jnp.reshape(args[0], (-1, args[0].shape[-1])))
        return next_fun(*args, **kwargs)

    for b in batches:
        with nn.intercept_methods(record):
            setup.model.apply({"params": base}, jnp.asarray(b)[:, :-1])
    return {p: jnp.concatenate(v) for p, v in seen.items()}


def _pieces(setup: _Setup, method: str, base: Any, paths: list[str]):
    """``(trainable, frozen, optimizer, loss_fn, schedule, to_dense)`` for one method."""
    import re

    import jax
    import optax

    import lrx.param as P

    c, f = setup.c, setup.c.finetune
    r = f.rank
    pattern = "^(" + "|".join(re.escape(p) for p in paths) + ")$"
    lr = {"full": f.full_learning_rate, "vera": f.random_basis_learning_rate,
          "randlora": f.random_basis_learning_rate, "nola": f.random_basis_learning_rate
          }.get(method, f.learning_rate)
    sched = finetuning.schedule(lr, f.warmup_steps, f.steps, 1.0)
    adamw = lm.optimizer_transform(_adamw_section(grad_clip=0.0), sched, mask=None)
    key = jax.random.key(c.seed + 7)
    stats = None
    factories = {
        "lora": lambda: P.lora(r, alpha=2 * r),
        "rslora": lambda: P.lora(r, alpha=2 * r, rslora=True),
        "pissa": lambda: P.lora(r, alpha=2 * r, init="pissa"),
        "olora": lambda: P.lora(r, alpha=2 * r, init="olora"),
        "lora_ga": lambda: P.LoRAGAFactory(rank=r, alpha=2 * r),
        "lora_sb": lambda: P.LoRASBFactory(rank=r, learning_rate=lr),
        "eva": lambda: P.EVAFactory(rank=r, alpha=2 * r),
        "dora": lambda: P.dora(r, alpha=2 * r),
        "vera": lambda: P.vera(f.vera_rank),
        "randlora": lambda: P.randlora(r),
        "nola": lambda: P.nola(r, f.nola_bases, f.nola_bases, alpha=2 * r),
        "sora": lambda: P.SoRAFactory(rank=r, alpha=2 * r),
        "dylora": lambda: P.DyLoRAFactory(rank=r, alpha=2 * r),
    }
    labels = None
    if method == "full":
        tree, opt = base, adamw
    elif method == "welore_lrc":
        tree, labels = P.welore_lrc(base, f.welore_reduction, paths_regex=pattern)
        opt = adamw
    else:
        factory = factories[method]()
        kind = getattr(factory, "needs_stat", None)
        if kind:
            stats = _stats(setup, base, paths, kind)
        tree = P.apply(base, [(pattern, factory)], key, stats=stats)
        opt = adamw if method != "sora" else optax.chain(adamw, P.sora_proximal(f.sora_threshold))
    trainable, frozen = P.partition(tree)
    if method != "full":
        if labels is None:
            labels = jax.tree.map(lambda x: "train" if P.is_node(x) else "freeze", trainable,
                                  is_leaf=P.is_node)
        labels = jax.tree.map(lambda x, lab: jax.tree.map(lambda _: lab, x), trainable, labels,
                              is_leaf=P.is_node)
        opt = optax.multi_transform({"train": opt, "freeze": optax.set_to_zero()}, labels)
    opt = optax.chain(optax.clip_by_global_norm(f.grad_clip), opt) if f.grad_clip else opt
    model = setup.model
    dylora = method == "dylora"

    def loss_fn(p, fz, batch, rng):
        if dylora:  # DyLoRA: one rank b ~ U{1..r} per step, from the loop's per-step key
            fz = P.set_rank(fz, P.dylora_sample_rank(rng, r))
        logits = model.apply({"params": P.combine(p, fz)}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), {}

    def trainable_count(p) -> int:
        if method == "full":
            return int(sum(x.size for x in jax.tree.leaves(p)))
        return int(sum(x.size for x, lab in zip(jax.tree.leaves(p), jax.tree.leaves(labels),
                                                strict=True) if lab == "train"))

    return trainable, frozen, opt, loss_fn, sched, trainable_count(trainable)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Pre-trains (or loads the cached model), fine-tunes with every method, writes the table,
    the plot and the summary."""
    import jax

    import lrx.param as P
    from lrx.train import loop

    wall0 = time.perf_counter()
    c = finetuning.merged(config, defaults)
    setup = _Setup(c)
    base = _pretrained(setup, workdir)
    paths = finetuning.matrix_paths(base, c.analysis.paths)
    before_src = setup.eval_dense(base, setup.eval_source)
    before_tgt = setup.eval_dense(base, setup.eval_target)
    rows = []
    for method in c.finetune.methods:
        t0 = time.perf_counter()
        p, fz, opt, loss_fn, sched, n_train = _pieces(setup, method, base, paths)
        log.info("fine-tuning with %s (%d trainable) for %d steps", method, n_train,
                 c.finetune.steps)
        result = finetuning.train(
            setup, os.path.join(workdir, f"finetune_{method}"), params=p, frozen=fz,
            optimizer=opt, loss_fn=loss_fn, tokens=setup.target_tokens,
            batch_size=c.finetune.batch_size, steps=c.finetune.steps, schedule=sched,
            eval_fn=None, eval_batches=(), eval_every=0,
            log_every=max(1, c.finetune.steps // 5))
        state = result["state"]
        wall = time.perf_counter() - t0
        full = P.combine(state.params, state.frozen)
        variants = [(method, full)]
        if method == "dylora":
            variants = [(f"dylora@{b}", P.set_rank(full, b)) for b in c.finetune.dylora_ranks]
        for name, tree in variants:
            tuned = jax.device_get(P.materialize(tree))
            spectra = finetuning.update_spectra(base, tuned, paths, k=c.analysis.intruder_k,
                                                thresholds=c.analysis.intruder_thresholds)
            tgt = setup.eval_dense(tuned, setup.eval_target)
            src = setup.eval_dense(tuned, setup.eval_source)
            eps = c.analysis.intruder_thresholds[len(c.analysis.intruder_thresholds) // 2]
            row = {"method": name, "target loss": tgt, "forgetting": src - before_src,
                   "trainable params": n_train,
                   "optimizer state bytes": loop.tree_bytes(state.opt_state),
                   f"intruders eps={eps}": spectra["intruders"][eps],
                   "eff. rank of dW": spectra["delta_effective_rank"],
                   "wall s": wall, "paper's claim": CLAIMS[method]}
            if method == "sora":
                gates = [x.gate for x in jax.tree.leaves(full, is_leaf=P.is_node)
                         if isinstance(x, P.SoRA)]
                row["paper's claim"] += (f"; measured nonzero gates "
                                         f"{int(sum((g != 0).sum() for g in gates))}/"
                                         f"{c.finetune.rank * len(gates)}")
            rows.append(row)
    title = (f"Fine-tuning on {c.data.target_genre} ({c.finetune.steps} steps, rank "
             f"{c.finetune.rank}) from the model pre-trained on the other plays (before: target "
             f"loss {before_tgt:.4f}, source loss {before_src:.4f}); forgetting = change of the "
             f"source-domain eval loss; intruders summed over {len(paths)} matrices")
    common.write_table(workdir, "finetune_table", rows, title=title)
    plot(workdir, rows, before_tgt, c.data.target_genre)
    summary = {"experiment": "finetune_table", "rows": rows,
               "before": {"target_loss": before_tgt, "source_loss": before_src},
               "matrices": len(paths), "wall_seconds": time.perf_counter() - wall0,
               "load_average": os.getloadavg()}
    common.write_summary(workdir, summary)
    return {"rows": len(rows), "wall_seconds": summary["wall_seconds"]}


def plot(workdir: str, rows: list[dict], before_target: float, genre: str) -> None:
    """``finetune_table.png``: target loss vs forgetting; runs far off the main cluster (target
    loss more than 0.5 above the pre-trained model's) are listed in the title, not drawn."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 6))
    off = [r for r in rows if r["target loss"] > before_target + 0.5]
    for row in rows:
        if row in off:
            continue
        ax.scatter(row["target loss"], row["forgetting"])
        ax.annotate(row["method"], (row["target loss"], row["forgetting"]), fontsize=8)
    ax.scatter([before_target], [0.0], marker="x", color="k")
    ax.annotate("pre-trained", (before_target, 0.0), fontsize=8)
    ax.set_xlabel(f"target ({genre}) eval loss")
    ax.set_ylabel("forgetting (source eval loss change)")
    if off:
        ax.set_title("off-scale: " + ", ".join(
            f"{r['method']} ({r['target loss']:.2f}, {r['forgetting']:+.2f})" for r in off),
            fontsize=9)
    common.savefig(fig, workdir, "finetune_table")


def _smoke(c: ml_collections.ConfigDict) -> None:
    c.model.hidden_size, c.model.intermediate_size = 16, 32
    c.model.num_heads, c.model.num_layers = 2, 1
    c.data.seq_len, c.data.eval_windows = 32, 4
    c.pretrain.steps, c.pretrain.batch_size, c.pretrain.warmup_steps = 3, 4, 1
    c.finetune.steps, c.finetune.batch_size, c.finetune.warmup_steps = 2, 4, 1
    c.finetune.rank, c.finetune.dylora_ranks, c.finetune.vera_rank = 2, (1, 2), 4
    c.finetune.nola_bases, c.finetune.stats_batches = 8, 1
    c.analysis.intruder_k = 4
    # one method per code path (dense, gradient stats, activation stats, proximal step, per-step
    # rank, WeLore labels); tests/experiments/test_finetune_table.py runs all of them
    c.finetune.methods = ("full", "lora_ga", "eva", "sora", "dylora", "welore_lrc")


def _quick(c: ml_collections.ConfigDict) -> None:
    """About a third of the default: fewer steps, same model."""
    c.pretrain.steps, c.finetune.steps = 200, 40


VARIANTS = {"smoke": _smoke, "quick": _quick}
