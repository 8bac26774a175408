"""Why the low-rank correction matters: S4 (HiPPO-LegS DPLR) vs S4D-LegS vs random diagonal SSMs
on long-range tasks (S4, arXiv 2111.00396; S4D, arXiv 2206.11893).

Tasks (``lrx.data.long_range``): the adding problem (length ``adding.length``; MSE, the trivial
predictor scores 1/6) and sequential 8x8 digits (length ``64 * digits.upsample**2``; test accuracy).
Models (``lrx.models.s4.S4Model``), switched by one config line each:

    s4-legs     mode='dplr', HiPPO-LegS with its rank-1 correction (bilinear)
    s4d-legs    mode='diag', the same Lambda without the low-rank term (ZOH)
    s4d-lin     mode='diag', S4D-Lin;   s4d-inv: S4D-Inv
    s4d-random  mode='diag', random imaginary parts (lrx.ssm.s4d_init 'random')

Training: ``lrx.train.scan.fit`` (one compiled scan; batches drawn inside jit from the key; digits
live on device and are indexed by sampled indices), AdamW with warmup + cosine for the non-SSM
parameters and Adam (lr ``optim.ssm_learning_rate``, no weight decay) for Lambda, P, B, log-step.
Outputs: ``results.md`` (task x model table), ``curves_<task>.png``, ``summary.json``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from experiments import common
from experiments.common import ConfigError

MODELS = {
    "s4-legs": dict(mode="dplr", ssm_init="legs", disc="bilinear"),
    "s4d-legs": dict(mode="diag", ssm_init="legs", disc="zoh"),
    "s4d-lin": dict(mode="diag", ssm_init="lin", disc="zoh"),
    "s4d-inv": dict(mode="diag", ssm_init="inv", disc="zoh"),
    "s4d-random": dict(mode="diag", ssm_init="random", disc="zoh"),
}
TASKS = ("adding", "digits")
SOLVED_MSE = 0.01  # the bar for "solves the adding problem" (the trivial predictor: 1/6)
log = logging.getLogger("lrx.s4")


def defaults() -> ml_collections.ConfigDict:
    """Schema with CPU defaults (about 10 minutes on 2 cores)."""
    c = ml_collections.ConfigDict()
    c.experiment = "s4"
    c.seed = 0
    c.seeds = 1
    c.tasks = ("adding", "digits")
    c.models = ("s4-legs", "s4d-legs", "s4d-random")
    c.model = ml_collections.ConfigDict(dict(
        d_model=32, n_layers=2, d_state=64, prenorm=False, activation="glu", chunk_size=0,
        dt_min=1e-3, dt_max=1e-1))
    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=1e-2, weight_decay=0.01, ssm_learning_rate=1e-3, warmup_steps=50))
    c.adding = ml_collections.ConfigDict(dict(length=256, steps=1500, batch_size=32,
                                              eval_size=512, log_every=100))
    c.digits = ml_collections.ConfigDict(dict(upsample=2, steps=600, batch_size=32,
                                              log_every=50))
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    common.check_keys(config, defaults())
    for t in config.tasks:
        common.check_choice(t, TASKS, "tasks")
    for m in config.models:
        common.check_choice(m, tuple(MODELS), "models")
    if not config.tasks or not config.models:
        raise ConfigError("config.tasks and config.models must be non-empty; valid tasks: "
                          f"{', '.join(TASKS)}; valid models: {', '.join(MODELS)}.")
    for key in ("d_model", "n_layers", "d_state"):
        common.check_positive(config.model[key], f"model.{key}")
    if config.model.d_state % 2:
        raise ConfigError(f"config.model.d_state={config.model.d_state} must be even (N/2 "
                          "conjugate modes are stored).")
    common.check_positive(config.model.chunk_size, "model.chunk_size", allow_zero=True)
    common.check_choice(config.model.activation, ("glu", "gelu"), "model.activation")
    for key in ("learning_rate", "ssm_learning_rate"):
        common.check_positive(config.optim[key], f"optim.{key}")
    for task in ("adding", "digits"):
        for key in ("steps", "batch_size", "log_every"):
            common.check_positive(config[task][key], f"{task}.{key}")
    if config.adding.length < 2:
        raise ConfigError(f"config.adding.length={config.adding.length} must be >= 2.")
    common.check_positive(config.digits.upsample, "digits.upsample")
    common.check_positive(config.seeds, "seeds")


def _model(config, name: str, d_output: int, pool: str, length: int):
    from lrx.models.s4 import S4Model

    m = config.model
    return S4Model(d_output=d_output, d_model=m.d_model, n_layers=m.n_layers, d_state=m.d_state,
                   prenorm=m.prenorm, activation=m.activation, pool=pool,
                   chunk_size=m.chunk_size or None, dt_min=m.dt_min, dt_max=m.dt_max,
                   l_max=length, **MODELS[name])


def _optimizer(config, steps: int):
    from lrx.models.s4 import s4_optimizer

    o = config.optim
    warmup = min(o.warmup_steps, max(steps // 2, 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup,
                                                  max(steps, warmup + 1))
    return s4_optimizer(schedule, o.weight_decay, o.ssm_learning_rate)


def _run_one(config, task: str, name: str, key: jax.Array) -> dict[str, Any]:
    """Trains ``config.seeds`` replicas of one (task, model) as one vmapped scan
    (:func:`lrx.train.scan.fit_replicas`); seed ``s`` changes the init and the training data, the
    test set is shared. Returns per-seed rows and curves."""
    from lrx.data import long_range
    from lrx.param import count_params
    from lrx.train.scan import fit_replicas

    tc = config[task]
    k_init, k_data, k_eval = jax.random.split(key, 3)
    if task == "adding":
        length = tc.length
        model = _model(config, name, 1, "last", length)
        batch_fn = lambda k: long_range.adding_batch(k, tc.batch_size, length)  # noqa: E731

        def loss_fn(params, batch):
            x, y = batch
            return jnp.mean((model.apply({"params": params}, x)[:, 0] - y) ** 2)

        x_eval, y_eval = long_range.adding_batch(k_eval, tc.eval_size, length)
    else:
        train, test = long_range.sequential_digits(tc.upsample, seed=config.seed)
        length = train.x.shape[1]
        model = _model(config, name, 10, "mean", length)
        x_train, y_train = jnp.asarray(train.x), jnp.asarray(train.y)
        batch_fn = lambda k: long_range.sample_batch(k, x_train, y_train, tc.batch_size)  # noqa

        def loss_fn(params, batch):
            x, y = batch
            logits = model.apply({"params": params}, x)
            return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

        x_eval, y_eval = jnp.asarray(test.x), jnp.asarray(test.y)
    seeds = range(config.seeds)
    inits = [model.init(common.seed_key(k_init, s), x_eval[:2])["params"] for s in seeds]
    params = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *inits)
    keys = jnp.stack([common.seed_key(k_data, s) for s in seeds])
    n_params = count_params(inits[0])
    start = time.time()
    params, history = fit_replicas(
        loss_fn, params, _optimizer(config, tc.steps), batch_fn, tc.steps, keys=keys,
        log_every=tc.log_every,
        callback=lambda s, v: log.info("%s/%s step %d loss %s", task, name, s,
                                       " ".join(f"{float(x):.4f}" for x in v)))
    seconds = time.time() - start
    apply = jax.jit(jax.vmap(lambda p, x: model.apply({"params": p}, x), in_axes=(0, None)))
    outs = jnp.concatenate([apply(params, x_eval[i:i + 128])
                            for i in range(0, len(x_eval), 128)], axis=1)  # (K, n, d_out)
    rows, curves = [], []
    for s in seeds:
        row: dict[str, Any] = dict(task=task, model=name, seed=config.seed + s,
                                   length=int(length), params=n_params, steps=tc.steps,
                                   train_loss=float(history["loss"][-1, s]),
                                   seconds=round(seconds / config.seeds, 1))
        if task == "adding":
            row["test_mse"] = float(jnp.mean((outs[s, :, 0] - y_eval) ** 2))
            row["baseline_mse"] = long_range.ADDING_BASELINE_MSE
        else:
            row["test_accuracy"] = float(jnp.mean(jnp.argmax(outs[s], -1) == y_eval))
        rows.append(row)
        curves.append(dict(step=np.asarray(history["step"]).tolist(),
                           loss=np.asarray(history["loss"][:, s]).tolist()))
    return dict(rows=rows, curves=curves)


def _aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, model): mean and std over seeds of the metrics, and the seed count."""
    out = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["model"]), []).append(r)
    for (task, name), rs in groups.items():
        agg: dict[str, Any] = dict(task=task, model=name, length=rs[0]["length"],
                                   steps=rs[0]["steps"], seeds=len(rs))
        for key in ("train_loss", "test_mse", "test_accuracy"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                agg[key] = float(np.mean(vals))
                agg[key + "_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        if "test_mse" in agg:
            agg["solved_seeds"] = sum(r["test_mse"] < SOLVED_MSE for r in rs)
        agg["seconds"] = round(sum(r["seconds"] for r in rs), 1)
        out.append(agg)
    return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    validate(config)
    key = jax.random.PRNGKey(config.seed)
    rows, curves = [], {}
    for ti, task in enumerate(config.tasks):
        for name in config.models:
            # same data stream and init key for every model of a task
            out = _run_one(config, task, name, jax.random.fold_in(key, ti))
            rows.extend(out["rows"])
            curves.setdefault(task, {})[name] = out["curves"]
            for r in out["rows"]:
                log.info("%s", r)
    columns = ["task", "model", "seed", "length", "params", "steps", "train_loss", "test_mse",
               "baseline_mse", "test_accuracy", "seconds"]
    common.write_table(workdir, "results", rows, columns,
                       title="Long-range tasks: S4 (DPLR) vs S4D, every seed")
    means = _aggregate(rows)
    common.write_table(workdir, "results_mean", means,
                       ["task", "model", "length", "steps", "seeds", "train_loss",
                        "train_loss_std", "test_mse", "test_mse_std", "solved_seeds",
                        "test_accuracy", "test_accuracy_std", "seconds"],
                       title=f"Mean and std over seeds (solved: test MSE < {SOLVED_MSE})")
    plt = common.pyplot()
    for task, by_model in curves.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for ci, (name, runs) in enumerate(by_model.items()):
            for si, c in enumerate(runs):
                ax.plot(c["step"], c["loss"], color=f"C{ci}", alpha=0.8,
                        label=name if si == 0 else None)
        if task == "adding":
            ax.axhline(1 / 6, color="gray", ls=":", label="predict the mean")
            ax.axhline(SOLVED_MSE, color="gray", ls="--", label=f"MSE {SOLVED_MSE}")
        ax.set_xlabel("step")
        ax.set_ylabel("train loss (block mean)")
        ax.set_yscale("log")
        ax.set_title(f"{task} ({config.seeds} seed{'s' if config.seeds > 1 else ''})")
        ax.legend(fontsize=7)
        common.savefig(fig, workdir, f"curves_{task}")
    summary = dict(results=rows, means=means, curves=curves)
    common.write_summary(workdir, summary)
    return summary
