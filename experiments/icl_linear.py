"""In-context linear regression: which learning algorithm does a trained transformer implement?

Reproduces, at CPU scale, the behavioural study of E. Akyürek, D. Schuurmans, J. Andreas, T. Ma,
D. Zhou, "What learning algorithm is in-context learning? Investigations with linear models"
(ICLR 2023, arXiv 2211.15661), the one-layer construction of J. von Oswald et al., "Transformers
learn in-context by gradient descent" (arXiv 2212.07677), and asks a new question: how do
low-rank constraints (GaLore, low-rank or LoRA-parameterised attention) change the learned
algorithm?

Studies (``config.study``):
  * ``fig1`` (Akyürek Fig. 1, noiseless): SPD and ILWD of a trained GPT against every reference
    predictor at every prefix k, R^2 of the model's linearity, and (``config.lsa.enabled``) the
    von Oswald check: the hand-set LSA layer equals one GD step, and a trained LSA layer compared
    with GD at the tuned step.
  * ``noise`` (Fig. 2): one model per (sigma, tau); MSPD (k < d) to ridge at each lambda; which
    lambda fits best vs the Bayes-optimal sigma^2/tau^2.
  * ``depth`` (Fig. 3): one model per depth; MSPD to 1-step GD, ridge and least squares.
  * ``lowrank``: one model per variant (dense Adam, GaLore at several ranks, low-rank or LoRA
    attention kernels at several ranks); SPD to least squares, 1-step GD and 3-NN vs rank.

Outputs in the workdir: ``summary.json``, Markdown tables (``*.md``) and PNG plots. All maths lives
in :mod:`lrx.linear.regression`, :mod:`lrx.analysis.icl`, :mod:`lrx.models.gpt`,
:mod:`lrx.data.icl`; training uses :func:`lrx.train.scan.fit`.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from typing import Any

import ml_collections

from experiments import common
from experiments.common import ConfigError

STUDIES = ("fig1", "noise", "depth", "lowrank")
LOWRANK_METHODS = ("dense", "galore", "lowrank", "lora")
log = logging.getLogger("lrx.icl_linear")


# ----------------------------------------------------------------------------------------------
# Config schema and validation
# ----------------------------------------------------------------------------------------------

def defaults() -> ml_collections.ConfigDict:
    """The config schema of ``icl_linear`` with the CPU defaults (study ``fig1``)."""
    c = ml_collections.ConfigDict()
    c.experiment = "icl_linear"
    c.study = "fig1"
    c.seed = 0
    c.seeds = 1
    c.data = ml_collections.ConfigDict(dict(dim=4, num_pairs=8, noise_std=0.0, weight_std=1.0))
    c.model = ml_collections.ConfigDict(dict(num_layers=3, hidden_size=64, num_heads=4,
                                             mlp_ratio=4))
    c.train = ml_collections.ConfigDict(dict(
        steps=12000, batch_size=64, learning_rate=1e-3, warmup_fraction=0.1, b1=0.9, b2=0.999,
        eps=1e-8, weight_decay=0.0, grad_clip=1.0, log_every=1000))
    c.eval = ml_collections.ConfigDict(dict(
        num_prompts=2000, tune_prompts=2000, probe_prompts=128, num_probes=0, step_grid=48,
        ridge_lambdas=(0.1, 0.5), gd_steps=3, knn_neighbors=3))
    c.sweep = ml_collections.ConfigDict(dict(
        noise=((0.0, 1.0), (0.25, 1.0), (0.5, 1.0), (0.5, 0.75)),
        noise_lambdas=(0.0, 1 / 16, 1 / 9, 1 / 4, 4 / 9, 1.0),
        depths=(1, 2, 4, 8),
        lowrank=("dense", "galore:1", "galore:4", "galore:16", "lowrank:1", "lowrank:4",
                 "lowrank:16", "lora:1", "lora:4", "lora:16")))
    c.lowrank = ml_collections.ConfigDict(dict(
        target=r".*/attn/(query|key|value|out)/kernel", lora_alpha=0.0, galore_scale=1.0,
        update_proj_gap=200, proj_type="std"))
    c.lsa = ml_collections.ConfigDict(dict(enabled=True, steps=4000, batch_size=512,
                                           learning_rate=1e-3))
    return c


def _parse_variant(text: str) -> tuple[str, int]:
    method, _, rank = str(text).partition(":")
    if method not in LOWRANK_METHODS:
        raise ConfigError(f"config.sweep.lowrank entry {text!r}: method {method!r} is not valid."
                          f"{common.suggest(method, LOWRANK_METHODS)} Valid methods: "
                          f"{', '.join(LOWRANK_METHODS)} (as 'method:rank', or 'dense').")
    if method == "dense":
        if rank:
            raise ConfigError(f"config.sweep.lowrank entry {text!r}: 'dense' takes no rank.")
        return method, 0
    if not rank.isdigit() or int(rank) < 1:
        raise ConfigError(f"config.sweep.lowrank entry {text!r}: need 'method:rank' with an "
                          f"integer rank >= 1, e.g. '{method}:4'.")
    return method, int(rank)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the key and the valid choices for any bad value."""
    common.check_keys(config, defaults())
    common.check_choice(config.study, STUDIES, "study")
    if not isinstance(config.seeds, int) or config.seeds < 1:
        raise ConfigError(f"config.seeds={config.seeds!r} must be an int >= 1 (the number of "
                          "seeds trained as one vmapped program per model).")
    if config.seeds > 1 and config.study == "fig1":
        raise ConfigError("config.seeds > 1 applies to the noise, depth and lowrank studies "
                          "(config arguments noise, depth, lowrank); fig1 trains one model.")
    d, m, t, e = config.data, config.model, config.train, config.eval
    for key in ("dim", "num_pairs"):
        if not isinstance(d[key], int) or d[key] < 1:
            raise ConfigError(f"config.data.{key}={d[key]!r} must be an int >= 1.")
    if d.num_pairs < 2:
        raise ConfigError("config.data.num_pairs must be >= 2 (prefix k = 0..num_pairs-1).")
    common.check_positive(d.noise_std, "data.noise_std", allow_zero=True)
    common.check_positive(d.weight_std, "data.weight_std")
    for key in ("num_layers", "hidden_size", "num_heads", "mlp_ratio"):
        if not isinstance(m[key], int) or m[key] < 1:
            raise ConfigError(f"config.model.{key}={m[key]!r} must be an int >= 1.")
    if m.hidden_size % m.num_heads:
        raise ConfigError(f"config.model.hidden_size={m.hidden_size} must be divisible by "
                          f"config.model.num_heads={m.num_heads}.")
    for key in ("steps", "batch_size", "log_every"):
        if not isinstance(t[key], int) or t[key] < 1:
            raise ConfigError(f"config.train.{key}={t[key]!r} must be an int >= 1.")
    common.check_positive(t.learning_rate, "train.learning_rate")
    if not 0 <= t.warmup_fraction < 1:
        raise ConfigError(f"config.train.warmup_fraction={t.warmup_fraction} must be in [0, 1).")
    common.check_positive(t.grad_clip, "train.grad_clip", allow_zero=True)
    common.check_positive(t.weight_decay, "train.weight_decay", allow_zero=True)
    for key in ("num_prompts", "tune_prompts", "probe_prompts", "step_grid", "gd_steps",
                "knn_neighbors"):
        if not isinstance(e[key], int) or e[key] < 1:
            raise ConfigError(f"config.eval.{key}={e[key]!r} must be an int >= 1.")
    if not isinstance(e.num_probes, int) or (e.num_probes and e.num_probes <= d.dim):
        raise ConfigError(f"config.eval.num_probes={e.num_probes!r} must be 0 (= 3 * dim) or an "
                          f"int > data.dim={d.dim} (the linear fit needs more probes than dims).")
    if e.probe_prompts > e.num_prompts:
        raise ConfigError("config.eval.probe_prompts must be <= config.eval.num_prompts.")
    for lam in e.ridge_lambdas:
        common.check_positive(lam, "eval.ridge_lambdas[...]", allow_zero=True)
    if config.study == "noise":
        if not config.sweep.noise:
            raise ConfigError("config.sweep.noise is empty: give (sigma, tau) pairs.")
        for pair in config.sweep.noise:
            if len(pair) != 2 or pair[0] < 0 or pair[1] <= 0:
                raise ConfigError(f"config.sweep.noise entry {pair!r} must be (sigma >= 0, "
                                  f"tau > 0).")
        for lam in config.sweep.noise_lambdas:
            common.check_positive(lam, "sweep.noise_lambdas[...]", allow_zero=True)
    if config.study == "depth":
        if not config.sweep.depths or any(not isinstance(L, int) or L < 1
                                           for L in config.sweep.depths):
            raise ConfigError(f"config.sweep.depths={config.sweep.depths!r} must be ints >= 1.")
    if config.study == "lowrank":
        if not config.sweep.lowrank:
            raise ConfigError("config.sweep.lowrank is empty.")
        for v in config.sweep.lowrank:
            _parse_variant(v)
        try:
            re.compile(config.lowrank.target)
        except re.error as err:
            raise ConfigError(f"config.lowrank.target={config.lowrank.target!r} is not a valid "
                              f"regex: {err}") from None
        common.check_choice(config.lowrank.proj_type, ("std", "left", "right", "reverse_std"),
                            "lowrank.proj_type")
    if config.lsa.enabled:
        for key in ("steps", "batch_size"):
            if not isinstance(config.lsa[key], int) or config.lsa[key] < 1:
                raise ConfigError(f"config.lsa.{key}={config.lsa[key]!r} must be an int >= 1.")
        common.check_positive(config.lsa.learning_rate, "lsa.learning_rate")


# ----------------------------------------------------------------------------------------------
# Building blocks: training and evaluation (composition of lrx pieces only)
# ----------------------------------------------------------------------------------------------

def _optimizer(train: Any, steps: int, inner: Any = None):
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        0.0, train.learning_rate, max(1, int(train.warmup_fraction * steps)), max(steps, 2))
    if inner is None:
        inner = optax.adamw(schedule, b1=train.b1, b2=train.b2, eps=train.eps,
                            weight_decay=train.weight_decay)
    else:
        inner = inner(schedule)
    parts = [optax.clip_by_global_norm(train.grad_clip)] if train.grad_clip > 0 else []
    return optax.chain(*parts, inner)


def _galore_transform(config, rank: int):
    """GaLore (lrx.optim.galore) on the kernels matched by ``config.lowrank.target``, full-rank
    Adam elsewhere; ``None`` if lrx.optim has no GaLore."""
    try:
        from lrx import optim as lrx_optim
        galore, path_mask = lrx_optim.galore, lrx_optim.path_mask
    except (ImportError, AttributeError):
        return None
    t, lr = config.train, config.lowrank

    def make(schedule):
        return galore(schedule, rank=rank, update_proj_gap=lr.update_proj_gap,
                      scale=lr.galore_scale, proj_type=lr.proj_type, b1=t.b1, b2=t.b2,
                      eps=t.eps, weight_decay=t.weight_decay,
                      mask=lambda params: path_mask(params, lr.target))

    return make


def train_models(config, model_cfg, data_cfg, key, variant: tuple[str, int] = ("dense", 0),
                 seeds: int = 1):
    """Trains ``seeds`` replicas of the GPT on fresh prompts as one vmapped program
    (:func:`lrx.train.scan.fit_replicas`); seed ``s`` changes the initialisation (the frozen
    random base of LoRA included) and the training prompts. Returns ``(apply_fn, [params_s],
    [info_s])``; ``apply_fn(params, tokens) -> (B, T)`` takes the full (combined) parameters."""
    import jax
    import jax.numpy as jnp

    from lrx import param as lrx_param
    from lrx.data import icl as icl_data
    from lrx.models import gpt
    from lrx.train.scan import fit_replicas

    d, n = data_cfg.dim, data_cfg.num_pairs
    model = gpt.GPT(model_cfg.num_layers, model_cfg.hidden_size, model_cfg.num_heads,
                    max_len=2 * n, mlp_ratio=model_cfg.mlp_ratio)
    method, rank = variant
    inner = None
    if method == "galore":
        inner = _galore_transform(config, rank)
        if inner is None:
            raise RuntimeError("lrx.optim.galore is not available")
    trainables, frozens, data_keys = [], [], []
    for s in range(seeds):
        k_init, k_data, k_param = jax.random.split(common.seed_key(key, s), 3)
        params = model.init(k_init, jnp.zeros((1, 2 * n - 1, d + 1)))["params"]
        if method in ("lowrank", "lora"):
            alpha = config.lowrank.lora_alpha or None
            factory = (lrx_param.lowrank(rank) if method == "lowrank"
                       else lrx_param.lora(rank, alpha))
            params = lrx_param.apply(params, [(config.lowrank.target, factory)], k_param)
        trainable, frozen = lrx_param.partition(params)
        trainables.append(trainable)
        frozens.append(frozen)
        data_keys.append(k_data)
    stack = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *trees)  # noqa

    def apply_fn(p, tokens):
        return model.apply({"params": p}, tokens)

    def batch_fn(k):
        p = icl_data.sample(k, config.train.batch_size, n, d, noise_std=data_cfg.noise_std,
                            weight_std=data_cfg.weight_std)
        return icl_data.interleave(p.x, p.y), p.y

    def loss_fn(p, batch, frozen):
        tokens, y = batch
        return jnp.mean((apply_fn(lrx_param.combine(p, frozen), tokens)[:, ::2] - y) ** 2)

    steps = config.train.steps
    start = time.time()
    trained, history = fit_replicas(
        loss_fn, stack(trainables), _optimizer(config.train, steps, inner), batch_fn, steps,
        keys=jnp.stack(data_keys), constants=stack(frozens),
        log_every=min(config.train.log_every, steps),
        callback=lambda s, v: log.info("step %d loss %s", s,
                                       " ".join(f"{float(x):.5f}" for x in v)))
    seconds = time.time() - start
    all_params, infos = [], []
    for s in range(seeds):
        trainable = jax.tree_util.tree_map(lambda x, s=s: x[s], trained)
        params = lrx_param.combine(trainable, frozens[s])
        counts = lrx_param.count(params) if hasattr(lrx_param, "count") else {}
        all_params.append(params)
        infos.append(dict(seed=config.seed + s, train_seconds=seconds / seeds,
                          final_loss=float(history["loss"][-1, s]),
                          loss_history=[float(v) for v in history["loss"][:, s]],
                          loss_steps=[int(t) for t in history["step"]],
                          num_params=lrx_param.count_params(trainable),
                          param_counts={k: int(v) for k, v in counts.items()} if counts else {}))
    return apply_fn, all_params, infos


def train_model(config, model_cfg, data_cfg, key, variant: tuple[str, int] = ("dense", 0)):
    """One seed of :func:`train_models`: ``(apply_fn, params, info)``."""
    apply_fn, params, infos = train_models(config, model_cfg, data_cfg, key, variant, 1)
    return apply_fn, params[0], infos[0]


def mean_rows(per_seed: list[dict]) -> dict:
    """One row from the same row of every seed: float fields become their mean, with the sample
    std as ``<key>_std`` when there are several seeds; other fields are kept from the first."""
    import numpy as np

    row = {}
    for key, value in per_seed[0].items():
        if isinstance(value, float):
            vals = [r[key] for r in per_seed]
            row[key] = float(np.mean(vals))
            if len(per_seed) > 1:
                row[key + "_std"] = float(np.std(vals, ddof=1))
        else:
            row[key] = value
    if len(per_seed) > 1:
        row["seeds"] = len(per_seed)
    return row


def reference_names(eval_cfg, data_cfg) -> list[str]:
    names = ["ols"] + [f"ridge({lam:g})" for lam in eval_cfg.ridge_lambdas]
    if data_cfg.noise_std > 0:
        names.append("ridge(bayes)")
    names += ["gd1", f"gd{eval_cfg.gd_steps}", "sgd", f"knn{eval_cfg.knn_neighbors}_uniform",
              f"knn{eval_cfg.knn_neighbors}_distance", "averaging"]
    return list(dict.fromkeys(names))


def evaluate(apply_fn, params, data_cfg, eval_cfg, key, extra_lambdas=()) -> dict:
    """Every metric of the model against every reference predictor, per prefix k.

    Returns a dict of NumPy arrays: ``spd[name] (n,)``, ``ilwd[name] (n,)``, ``error[name] (n,)``
    (squared error against the targets / d, 'model' included), ``r2 (n,)`` (model linearity),
    ``steps[name] (n,)`` (tuned step sizes).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from lrx.analysis import icl as metrics
    from lrx.data import icl as icl_data
    from lrx.linear import regression as reg

    d, n = data_cfg.dim, data_cfg.num_pairs
    kgd, knn_k = eval_cfg.gd_steps, eval_cfg.knn_neighbors
    bp = eval_cfg.probe_prompts
    m = eval_cfg.num_probes or 3 * d
    bayes = reg.bayes_lambda(data_cfg.noise_std, data_cfg.weight_std)
    lambdas = list(eval_cfg.ridge_lambdas) + list(extra_lambdas)

    def sample(k, b):
        return icl_data.sample(k, b, n, d, noise_std=data_cfg.noise_std,
                               weight_std=data_cfg.weight_std)

    def all_prefixes(fn, x, y, *args, **static):
        return jax.vmap(lambda xi, yi: reg.prefix_weights(fn, xi, yi, *args, **static))(x, y)

    def knn(x, y, q, weighting):
        return jax.vmap(lambda a, b, c: reg.prefix_knn(a, b, c, knn_k, weighting))(x, y, q)

    def sync(fn, *args, **static):
        # One jitted call at a time, each with at most one batched SVD, waited for: jaxlib's
        # CPU LAPACK kernels parallelise over the batch on the intra-op thread pool, and two
        # such kernels running concurrently inside one XLA program can deadlock on a 2-core
        # machine (observed with jax 0.10.2).
        return jax.block_until_ready(jax.jit(functools.partial(fn, **static))(*args))

    def tune_all(key):
        k_test, k_tune, k_probe = jax.random.split(key, 3)
        test, tune = sample(k_test, eval_cfg.num_prompts), sample(k_tune, eval_cfg.tune_prompts)
        grid = jnp.geomspace(1e-3, 1.0, eval_cfg.step_grid)
        steps = {
            "gd1": reg.tune_step(reg.gradient_descent, tune.x, tune.y, grid, num_steps=1),
            f"gd{kgd}": reg.tune_step(reg.gradient_descent, tune.x, tune.y, grid,
                                      num_steps=kgd),
            "sgd": reg.tune_step(reg.sgd, tune.x, tune.y, grid),
        }
        probes = jax.random.normal(k_probe, (bp, n, m, d))
        return test.x, test.y, steps, probes

    x, y, steps, probes = sync(tune_all, key)
    specs = {"ols": (reg.least_squares, (), {})}
    for lam in lambdas:
        specs[f"ridge({lam:g})"] = (reg.ridge, (lam,), {})
    if data_cfg.noise_std > 0:
        specs["ridge(bayes)"] = (reg.ridge, (bayes,), {})
    specs["gd1"] = (reg.gradient_descent, (steps["gd1"],), {"num_steps": 1})
    specs[f"gd{kgd}"] = (reg.gradient_descent, (steps[f"gd{kgd}"],), {"num_steps": kgd})
    specs["sgd"] = (reg.sgd, (steps["sgd"],), {})
    specs["averaging"] = (reg.averaging, (), {})
    weights = {name: sync(lambda x, y, *a, fn=fn, kw=kw: all_prefixes(fn, x, y, *a, **kw),
                          x, y, *a)
               for name, (fn, a, kw) in specs.items()}

    def predictions(params, x, y, probes, weights):
        # Predictions at the query x_k of every prefix k.
        preds = {name: reg.predict(w, x) for name, w in weights.items()}
        for weighting in ("uniform", "distance"):
            preds[f"knn{knn_k}_{weighting}"] = knn(x, y, x[:, :, None, :], weighting)[..., 0]
        preds["model"] = apply_fn(params, icl_data.interleave(x, y))[:, ::2]
        out = {"spd": {}, "error": {}}
        for name, p in preds.items():
            out["error"][name] = metrics.error_curve(p, y, d)
            if name != "model":
                out["spd"][name] = metrics.spd(preds["model"], p, d)
        # Outputs at probe inputs x'_j ~ N(0, I) put at the query position of prefix k (the
        # model is causal, so the later tokens do not matter).
        px, py = x[:bp], y[:bp]
        tokens = icl_data.interleave(px, py)  # (bp, 2n-1, d+1)

        def at_prefix(k):
            seq = icl_data.place_probes(tokens, probes[:, k], 2 * k, "interleave")
            return apply_fn(params, seq.reshape((bp * m,) + tokens.shape[1:]))[:, 2 * k]

        probe_out = {"model": jax.lax.map(at_prefix, jnp.arange(n)).reshape(n, bp, m)
                     .transpose(1, 0, 2)}
        for weighting in ("uniform", "distance"):
            probe_out[f"knn{knn_k}_{weighting}"] = knn(px, py, probes, weighting)
        return out, probe_out

    out, probe_out = sync(predictions, params, x, y, probes, weights)
    fits = {name: sync(metrics.implicit_weights, v, probes) for name, v in probe_out.items()}
    w_model = fits.pop("model")[0]
    out["r2"] = sync(metrics.linearity_r2, probe_out["model"], probes)
    implicit = {name: w[:bp] for name, w in weights.items()}
    implicit.update({name: f[0] for name, f in fits.items()})
    out["ilwd"] = {name: metrics.ilwd(w_model, w) for name, w in implicit.items()}
    out["steps"] = steps
    return jax.tree.map(lambda a: np.asarray(a, np.float64), out)


def _summarise_refs(res: dict, d: int) -> list[dict]:
    from lrx.analysis import icl as metrics

    rows = []
    for name in res["spd"]:
        spd, ilwd = res["spd"][name], res["ilwd"][name]
        rows.append(dict(reference=name, spd=float(metrics.mspd(spd, 1)),
                         mspd=float(metrics.underdetermined_mspd(spd, d)),
                         ilwd=float(ilwd[1:].mean()),
                         ref_error=float(res["error"][name][1:].mean())))
    return rows


def _curve_rows(res: dict, names: list[str], key: str) -> list[dict]:
    n = len(res[key][names[0]])
    return [{"k": k, **{name: float(res[key][name][k]) for name in names}} for k in range(n)]


def _plot_curves(workdir, name, res, key, names, ylabel, title):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for ref in names:
        curve = res[key][ref]
        ax.plot(range(1, len(curve)), curve[1:], marker="o", ms=3, label=ref)
    ax.set_yscale("log")
    ax.set_xlabel("number of in-context examples k")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    common.savefig(fig, workdir, name)


def _plot_loss(workdir, runs: dict):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, info in runs.items():
        ax.plot(info["loss_steps"], info["loss_history"], label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE)")
    ax.legend(fontsize=7)
    common.savefig(fig, workdir, "loss")


# ----------------------------------------------------------------------------------------------
# von Oswald et al.: one linear self-attention layer vs one GD step
# ----------------------------------------------------------------------------------------------

def run_lsa(config, key) -> dict:
    """Hand-set LSA == one GD step (max abs diff); a trained LSA vs GD at the tuned step."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from lrx.analysis import icl as metrics
    from lrx.data import icl as icl_data
    from lrx.linear import regression as reg
    from lrx.models import gpt
    from lrx.train.scan import fit

    d, n = config.data.dim, config.data.num_pairs  # n context pairs + 1 query
    cfg = config.lsa
    sample = lambda k, b: icl_data.sample(k, b, n + 1, d, noise_std=config.data.noise_std,
                                          weight_std=config.data.weight_std)
    split = lambda p: (icl_data.stack_tokens(p.x[:, :n], p.y[:, :n], p.x[:, n]), p.y[:, n])
    lsa = gpt.LinearSelfAttention()
    k_init, k_data, k_test, k_tune, k_probe = jax.random.split(key, 5)
    params = lsa.init(k_init, jnp.zeros((1, n + 1, d + 1)))

    def loss_fn(p, batch):
        tokens, y = batch
        return jnp.mean((lsa.apply(p, tokens) - y) ** 2)

    opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate,
                                                        max(1, cfg.steps // 10), cfg.steps))
    start = time.time()
    params, hist = fit(loss_fn, params, opt, lambda k: split(sample(k, cfg.batch_size)),
                       cfg.steps, key=k_data, log_every=max(1, cfg.steps // 4))
    seconds = time.time() - start

    @jax.jit
    def compare(params):
        test, tune = sample(k_test, 4096), sample(k_tune, 4096)
        grid = jnp.geomspace(1e-3, 1.0, 4 * config.eval.step_grid)
        alpha = reg.tune_step(reg.gradient_descent, tune.x, tune.y, grid)[n]
        w_gd = jax.vmap(lambda x, y: reg.gradient_descent(x, y, n, alpha))(test.x, test.y)
        tokens, y = split(test)
        pred_gd = reg.predict(w_gd, test.x[:, n])
        pred_lsa = lsa.apply(params, tokens)
        # The same GD step as an LSA layer (von Oswald's eta = 2 * n * alpha).
        pred_built = lsa.apply(gpt.gd_lsa_params(d, 2 * n * alpha), tokens)
        # LSA's implicit weights: its output is linear in x_q; fit on probes.
        probes = jax.random.normal(k_probe, (512, 3 * d, d))
        ctx = tokens[:512]
        probe_tok = icl_data.place_probes(ctx, probes, n, "stack")
        out = lsa.apply(params, probe_tok.reshape((-1,) + ctx.shape[1:])).reshape(512, 3 * d)
        # one query per prompt: curves over a single "prefix" axis of length 1
        w_lsa, w_ref = metrics.implicit_weights(out, probes)[0][:, None], w_gd[:512, None]
        return dict(
            construction_max_abs_diff=jnp.max(jnp.abs(pred_built - pred_gd)),
            gd_tuned_step_alpha=alpha, gd_tuned_eta=2 * n * alpha,
            loss_lsa=jnp.mean((pred_lsa - y) ** 2), loss_gd=jnp.mean((pred_gd - y) ** 2),
            loss_zero=jnp.mean(y**2),
            spd_lsa_gd=metrics.spd(pred_lsa[:, None], pred_gd[:, None], d)[0],
            ilwd_lsa_gd=metrics.ilwd(w_lsa, w_ref)[0],
            cosine_lsa_gd=metrics.cosine(w_lsa, w_ref)[0])

    result = {k: float(v) for k, v in compare(params).items()}
    return dict(dim=d, num_context=n, steps=cfg.steps, train_seconds=seconds, **result,
                final_train_loss=float(np.asarray(hist["loss"][-1])))


# ----------------------------------------------------------------------------------------------
# Studies
# ----------------------------------------------------------------------------------------------

def _fig1(config, workdir, key) -> dict:
    import jax

    k_train, k_eval, k_lsa = jax.random.split(key, 3)
    apply_fn, params, info = train_model(config, config.model, config.data, k_train)
    res = evaluate(apply_fn, params, config.data, config.eval, k_eval)
    d = config.data.dim
    names = reference_names(config.eval, config.data)
    rows = _summarise_refs(res, d)
    by = {r["reference"]: r for r in rows}
    knn = f"knn{config.eval.knn_neighbors}_uniform"
    headline = dict(
        spd_ols=by["ols"]["spd"], spd_gd1=by["gd1"]["spd"], spd_knn3=by[knn]["spd"],
        ratio_spd_gd1_over_ols=by["gd1"]["spd"] / by["ols"]["spd"],
        ratio_spd_knn3_over_ols=by[knn]["spd"] / by["ols"]["spd"],
        ratio_ilwd_gd1_over_ols=by["gd1"]["ilwd"] / by["ols"]["ilwd"],
        ratio_ilwd_knn3_over_ols=by[knn]["ilwd"] / by["ols"]["ilwd"],
        closest_reference=min(rows, key=lambda r: r["spd"])["reference"])
    common.write_table(workdir, "references", rows,
                       ["reference", "spd", "mspd", "ilwd", "ref_error"],
                       title="Model vs reference predictors (mean over k = 1..n-1; mspd: k < d)")
    common.write_table(workdir, "spd_per_k", _curve_rows(res, names, "spd"),
                       title="SPD(model, reference) / d per number of examples k")
    common.write_table(workdir, "ilwd_per_k", _curve_rows(res, names, "ilwd"),
                       title="ILWD(model, reference) per k")
    err_names = ["model"] + names
    common.write_table(workdir, "error_per_k", _curve_rows(res, err_names, "error"),
                       title="Squared error / d against the targets per k")
    _plot_curves(workdir, "spd", res, "spd", names, "SPD / d", "Model vs references (SPD)")
    _plot_curves(workdir, "ilwd", res, "ilwd", names, "ILWD", "Model vs references (ILWD)")
    _plot_curves(workdir, "error", res, "error", err_names, "squared error / d",
                 "Prediction error vs k")
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(range(len(res["r2"])), res["r2"], marker="o")
    ax.set_xlabel("k")
    ax.set_ylabel("R^2 of the best linear fit")
    ax.axvline(d, color="gray", ls=":")
    common.savefig(fig, workdir, "linearity_r2")
    _plot_loss(workdir, {"model": info})
    summary = dict(study="fig1", headline=headline, references=rows,
                   r2_per_k=res["r2"].tolist(),
                   spd_per_k={k: v.tolist() for k, v in res["spd"].items()},
                   ilwd_per_k={k: v.tolist() for k, v in res["ilwd"].items()},
                   error_per_k={k: v.tolist() for k, v in res["error"].items()},
                   tuned_steps={k: v.tolist() for k, v in res["steps"].items()},
                   train={k: v for k, v in info.items() if k not in ("loss_history",)})
    if config.lsa.enabled:
        summary["lsa"] = run_lsa(config, k_lsa)
        common.write_table(workdir, "lsa", [summary["lsa"]],
                           title="von Oswald et al.: linear self-attention vs one GD step")
    return summary


def _noise(config, workdir, key) -> dict:
    import jax
    import numpy as np

    from lrx.analysis import icl as metrics

    lambdas = [float(v) for v in config.sweep.noise_lambdas]
    rows, curves, runs, per_seed = [], {}, {}, []
    for i, (sigma, tau) in enumerate(config.sweep.noise):
        data = ml_collections.ConfigDict(config.data.to_dict())
        data.noise_std, data.weight_std = float(sigma), float(tau)
        k_train, k_eval = jax.random.split(jax.random.fold_in(key, i))
        apply_fn, params, infos = train_models(config, config.model, data, k_train,
                                               seeds=config.seeds)
        label = f"sigma={sigma:g},tau={tau:g}"
        seed_rows, seed_curves = [], []
        for s, (p, info) in enumerate(zip(params, infos, strict=True)):
            res = evaluate(apply_fn, p, data, config.eval, k_eval, extra_lambdas=lambdas)
            runs[label if s == 0 else f"{label},seed={info['seed']}"] = info
            row = {"sigma": float(sigma), "tau": float(tau), "bayes_lambda": sigma**2 / tau**2}
            for lam in lambdas:
                name = "ols" if lam == 0 else f"ridge({lam:g})"
                row[f"mspd[{lam:.3g}]"] = float(metrics.underdetermined_mspd(res["spd"][name],
                                                                             data.dim))
            row["best_lambda"] = min(lambdas, key=lambda lam: row[f"mspd[{lam:.3g}]"])
            seed_rows.append(row)
            seed_curves.append(res["spd"])
            per_seed.append({"seed": info["seed"], **row})
        row = mean_rows(seed_rows)
        best = min(lambdas, key=lambda lam: row[f"mspd[{lam:.3g}]"])  # of the seed-mean MSPD
        row["best_lambda"] = best
        row["best_is_bayes"] = bool(abs(best - row["bayes_lambda"]) < 1e-9)
        row["seeds_best_is_bayes"] = sum(abs(r["best_lambda"] - r["bayes_lambda"]) < 1e-9
                                         for r in seed_rows)
        rows.append(row)
        curves[label] = {k: np.mean([c[k] for c in seed_curves], axis=0).tolist()
                         for k in seed_curves[0]}
    cols = (["sigma", "tau", "bayes_lambda"] + [f"mspd[{lam:.3g}]" for lam in lambdas]
            + ["best_lambda", "best_is_bayes"]
            + (["seeds_best_is_bayes", "seeds"] if config.seeds > 1 else []))
    common.write_table(workdir, "noise", rows, cols,
                       title="MSPD (k < d) between the model and ridge(lambda) per (sigma, tau)"
                             f" (mean over {config.seeds} seed(s))")
    plt = common.pyplot()
    import numpy as np

    mat = np.array([[r[f"mspd[{lam:.3g}]"] for lam in lambdas] for r in rows])
    fig, ax = plt.subplots(figsize=(1.2 * len(lambdas) + 2, 0.6 * len(rows) + 2))
    im = ax.imshow(np.log10(mat), cmap="viridis_r")
    ax.set_xticks(range(len(lambdas)), [f"{v:.3g}" for v in lambdas])
    ax.set_yticks(range(len(rows)), [f"σ²/τ²={r['bayes_lambda']:.3g}" for r in rows])
    ax.set_xlabel("ridge lambda")
    for i, r in enumerate(rows):
        j = lambdas.index(r["best_lambda"])
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, color="red", lw=2))
    fig.colorbar(im, label="log10 MSPD")
    common.savefig(fig, workdir, "noise_mspd")
    _plot_loss(workdir, runs)
    return dict(study="noise", rows=rows, spd_per_k=curves,
                all_best_is_bayes=all(r["best_is_bayes"] for r in rows), per_seed=per_seed,
                train={k: {kk: vv for kk, vv in v.items() if kk != "loss_history"}
                       for k, v in runs.items()})


def _depth(config, workdir, key) -> dict:
    import jax

    from lrx.analysis import icl as metrics

    rows, runs, per_seed = [], {}, []
    d = config.data.dim
    names = reference_names(config.eval, config.data)
    for i, depth in enumerate(config.sweep.depths):
        model = ml_collections.ConfigDict(config.model.to_dict())
        model.num_layers = int(depth)
        k_train, k_eval = jax.random.split(jax.random.fold_in(key, i))
        apply_fn, params, infos = train_models(config, model, config.data, k_train,
                                               seeds=config.seeds)
        seed_rows = []
        for s, (p, info) in enumerate(zip(params, infos, strict=True)):
            res = evaluate(apply_fn, p, config.data, config.eval, k_eval)
            runs[f"L={depth}" if s == 0 else f"L={depth},seed={info['seed']}"] = info
            row = {"layers": int(depth), "params": info["num_params"],
                   "model_error": float(res["error"]["model"][1:].mean())}
            for name in names:
                row[f"mspd[{name}]"] = float(metrics.underdetermined_mspd(res["spd"][name], d))
                row[f"spd[{name}]"] = float(metrics.mspd(res["spd"][name], 1))
            seed_rows.append(row)
            per_seed.append({"seed": info["seed"], **row})
        row = mean_rows(seed_rows)
        row["closest_mspd"] = min(names, key=lambda nm: row[f"mspd[{nm}]"])
        row["closest_spd"] = min(names, key=lambda nm: row[f"spd[{nm}]"])
        rows.append(row)
    shown = ["gd1", *[f"ridge({lam:g})" for lam in config.eval.ridge_lambdas], "ols"]
    std = [f"mspd[{nm}]_std" for nm in shown] if config.seeds > 1 else []
    cols = ["layers", "params", "model_error"] + [f"mspd[{nm}]" for nm in shown] + std + [
        "closest_mspd", "closest_spd"] + (["seeds"] if config.seeds > 1 else [])
    common.write_table(workdir, "depth", rows, cols,
                       title="Depth sweep: MSPD (k < d) of the model to each reference")
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    depths = [r["layers"] for r in rows]
    for nm in shown:
        ax.plot(depths, [r[f"mspd[{nm}]"] for r in rows], marker="o", label=nm)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("layers")
    ax.set_ylabel("MSPD (k < d)")
    ax.legend(fontsize=7)
    common.savefig(fig, workdir, "depth_mspd")
    _plot_loss(workdir, runs)
    return dict(study="depth", rows=rows, per_seed=per_seed,
                train={k: {kk: vv for kk, vv in v.items() if kk != "loss_history"}
                       for k, v in runs.items()})


def _lowrank(config, workdir, key) -> dict:
    import jax

    from lrx.analysis import icl as metrics

    rows, runs, skipped = [], {}, []
    d = config.data.dim
    k_train, k_eval = jax.random.split(key)
    per_seed = []
    for text in config.sweep.lowrank:
        variant = _parse_variant(text)
        if variant[0] == "galore" and _galore_transform(config, 1) is None:
            skipped.append(dict(variant=text, reason="lrx.optim.galore is not available"))
            continue
        # Same data and evaluation keys for every variant: only the constraint differs.
        apply_fn, params, infos = train_models(config, config.model, config.data, k_train,
                                               variant, seeds=config.seeds)
        seed_rows = []
        for s, (p, info) in enumerate(zip(params, infos, strict=True)):
            res = evaluate(apply_fn, p, config.data, config.eval, k_eval)
            runs[text if s == 0 else f"{text},seed={info['seed']}"] = info
            knn = f"knn{config.eval.knn_neighbors}_uniform"
            row = {"variant": text, "method": variant[0], "rank": variant[1],
                   "trainable": info["num_params"], "final_loss": info["final_loss"],
                   "model_error": float(res["error"]["model"][1:].mean()),
                   "spd_ols": float(metrics.mspd(res["spd"]["ols"], 1)),
                   "spd_gd1": float(metrics.mspd(res["spd"]["gd1"], 1)),
                   "spd_knn3": float(metrics.mspd(res["spd"][knn], 1)),
                   "ilwd_ols": float(res["ilwd"]["ols"][1:].mean()),
                   "mspd_ols": float(metrics.underdetermined_mspd(res["spd"]["ols"], d)),
                   "r2_mean": float(res["r2"][1:].mean())}
            row["closest"] = min(("ols", "gd1", "knn3"), key=lambda nm: row[f"spd_{nm}"])
            seed_rows.append(row)
            per_seed.append({"seed": info["seed"], **row})
        row = mean_rows(seed_rows)
        row["closest"] = min(("ols", "gd1", "knn3"), key=lambda nm: row[f"spd_{nm}"])
        row["seeds_closest"] = "/".join(r["closest"] for r in seed_rows)
        rows.append(row)
    if rows:
        cols = None
        if config.seeds > 1:
            cols = ["variant", "trainable", "final_loss", "model_error", "model_error_std",
                    "spd_ols", "spd_ols_std", "spd_gd1", "spd_gd1_std", "spd_knn3",
                    "spd_knn3_std", "closest", "seeds_closest", "seeds"]
        common.write_table(workdir, "lowrank", rows, cols,
                           title="Low-rank constraints: SPD of the model to OLS / GD / 3-NN "
                                 f"(mean over {config.seeds} seed(s))")
        plt = common.pyplot()
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        dense = [r for r in rows if r["method"] == "dense"]
        for method in ("galore", "lowrank", "lora"):
            sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["rank"])
            if sel:
                for ax, key in zip(axes, ("spd_ols", "model_error"), strict=True):
                    ax.errorbar([r["rank"] for r in sel], [r[key] for r in sel],
                                yerr=[r.get(key + "_std", 0.0) for r in sel], marker="o",
                                capsize=3, label=method)
        for r in dense:
            axes[0].axhline(r["spd_ols"], color="k", ls="--", label="dense")
            axes[1].axhline(r["model_error"], color="k", ls="--", label="dense")
        for ax, lab in zip(axes, ("SPD(model, OLS) / d", "model error / d"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("rank")
            ax.set_ylabel(lab)
            ax.legend(fontsize=7)
        common.savefig(fig, workdir, "lowrank_spd")
        _plot_loss(workdir, runs)
    return dict(study="lowrank", rows=rows, skipped=skipped, per_seed=per_seed,
                train={k: {kk: vv for kk, vv in v.items() if kk != "loss_history"}
                       for k, v in runs.items()})


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs ``config.study``; writes summary.json, tables and plots in ``workdir``."""
    import jax

    validate(config)
    start = time.time()
    key = jax.random.key(config.seed)
    study = {"fig1": _fig1, "noise": _noise, "depth": _depth, "lowrank": _lowrank}[config.study]
    summary = study(config, workdir, key)
    summary["wall_seconds"] = time.time() - start
    summary["config"] = common.to_dict(config)
    if config.study == "fig1":
        h = summary["headline"]
        log.info("SPD(model, OLS)=%.3g  SPD(model, GD1)=%.3g (x%.1f)  SPD(model, 3NN)=%.3g (x%.1f)",
                 h["spd_ols"], h["spd_gd1"], h["ratio_spd_gd1_over_ols"], h["spd_knn3"],
                 h["ratio_spd_knn3_over_ols"])
    summary = _finite(summary)
    common.write_summary(workdir, summary)
    return summary


def _finite(obj: Any) -> Any:
    """NaN/inf -> None so that summary.json is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
