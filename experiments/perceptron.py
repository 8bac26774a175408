"""Step-size study: logistic regression by gradient descent at large step sizes becomes the batch
perceptron; Normalized LR+GD. Every numbered claim of Tyurin, "From Logistic Regression to the
Perceptron Algorithm: Exploring Gradient Descent with Large Step Sizes" (arXiv 2412.08424) that
fits on a CPU is checked and reported here:

  * Thm 3.2: ``max_t ||theta_t / gamma - theta_hat_t||`` (LR+GD vs Batch Perceptron, whose first
    step carries the factor 1/2) for gamma = 1e2..1e6 shrinks monotonically to float precision;
  * Thm 4.1: on the two-point example the loss after step 1 grows like gamma/8 while step 2
    separates the data;
  * Thms 3.3 / 5.2 / 5.3 / 6.1: iteration bounds ``n R^2/mu^2`` (Batch Perceptron),
    ``R^2/mu^2`` (classical and Normalized Batch Perceptron) and ``R^2/mu^2 + 2 log(2n-1) /
    (gamma mu^2)`` (Normalized LR+GD), with ``mu`` computed by ``lrx.data.separable.max_margin``;
  * Thm 5.1: on the worst-case dataset the Batch Perceptron needs ``floor((3n+2)/10) + 1``
    iterations (linear in n);
  * Table 1 (worst-case rows) next to the paper's numbers, plus the same table on digits and on
    planted synthetic data; Fig. 1 analogue (accuracy, loss, gradient norm vs iteration).

Optional companion (Wu, Bartlett, Telgarsky & Yu, COLT 2024): LR+GD with a budget-dependent
constant step ``gamma = c T``; the loss after ``T`` steps against ``T`` (log-log slope; their
bound is O~(1/T^2), versus O~(1/T) for a fixed small gamma).

Outputs in the workdir: ``fig1_digits.png``, ``fig1_synthetic.png``, ``worst_case_n.png``,
``budget.png``, ``table1.md``, ``thm32.md``, ``thm41.md``, ``bounds.md``, ``worst_case_n.md``,
``budget.md``, ``summary.json``.
The math lives in :mod:`lrx.linear.logistic`, :mod:`lrx.linear.perceptron` and
:mod:`lrx.data.separable`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import common
from lrx.data import separable
from lrx.linear import logistic, perceptron

# Tyurin's Table 1, worst-case dataset (n = 1000 by our reproduction, see README).
PAPER_TABLE1 = {("Normalized LR+GD", 100.0): 2, ("Normalized LR+GD", 10.0): 2,
                ("Normalized LR+GD", 1.0): 16, ("Normalized LR+GD", 0.1): 157,
                ("LR+GD", 100.0): 308}

def defaults() -> ml_collections.ConfigDict:
    """The config schema of ``perceptron`` with the defaults of the full study (about a minute)."""
    config = ml_collections.ConfigDict()
    config.experiment = "perceptron"
    config.dtype = "float64"  # the limit studies need float64; 'float32' also runs
    # Fig. 1 analogue and the digits / synthetic rows of Table 1: the paper's step-size grid.
    config.gammas = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    config.num_steps = 4000
    config.digits = ml_collections.ConfigDict({"positive": 1, "negative": 8})
    config.synthetic = ml_collections.ConfigDict(
        {"n": 1000, "d": 10, "mu": 0.01, "radius": 1.0, "spread": 0.02, "seed": 0})
    # Thm 3.2: theta_t / gamma -> Batch Perceptron iterates (over the same horizons).
    config.limit_gammas = (1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
    # Thm 4.1: the two-point example.
    config.two_point_gammas = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
    # Thm 5.1 / Table 1: the worst-case dataset.
    config.worst_case = ml_collections.ConfigDict({
        "n": 1000,
        "sizes": (10, 30, 100, 300, 1000, 3000),
        "normalized_gammas": (100.0, 10.0, 1.0, 0.1),
        "gammas": (0.1, 1.0, 10.0, 100.0, 1e3, 1e6),
        "num_steps": 2000,
    })
    config.classical_max_epochs = 2000
    # Wu, Bartlett, Telgarsky & Yu (COLT 2024): gamma = c * T for a budget of T steps (digits).
    config.budget = ml_collections.ConfigDict({
        "steps": (100, 200, 400, 800, 1600, 3200),
        "scales": (0.01, 0.1, 1.0),
        "baseline_gamma": 1.0,
    })
    return config


def _check_int(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise common.ConfigError(f"config.{key}={value!r} must be an integer >= {minimum}.")


def _check_gammas(values: Any, key: str) -> None:
    if not isinstance(values, (tuple, list)) or len(values) == 0:
        raise common.ConfigError(f"config.{key}={values!r} must be a non-empty tuple of step "
                                 "sizes gamma > 0.")
    for i, value in enumerate(values):
        common.check_positive(value, f"{key}[{i}]")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for unknown keys, wrong types or impossible values."""
    common.check_keys(config, defaults())
    common.check_choice(config.dtype, ("float64", "float32"), "dtype")
    _check_gammas(config.gammas, "gammas")
    _check_gammas(config.limit_gammas, "limit_gammas")
    _check_gammas(config.two_point_gammas, "two_point_gammas")
    _check_gammas(config.worst_case.normalized_gammas, "worst_case.normalized_gammas")
    _check_gammas(config.worst_case.gammas, "worst_case.gammas")
    _check_int(config.num_steps, "num_steps", 1)
    _check_int(config.worst_case.num_steps, "worst_case.num_steps", 1)
    _check_int(config.classical_max_epochs, "classical_max_epochs", 1)
    _check_gammas(config.budget.scales, "budget.scales")
    common.check_positive(config.budget.baseline_gamma, "budget.baseline_gamma")
    if not config.budget.steps:
        raise common.ConfigError("config.budget.steps must be a non-empty tuple of budgets T >= 1.")
    for i, t in enumerate(config.budget.steps):
        _check_int(t, f"budget.steps[{i}]", 1)
    for key in ("positive", "negative"):
        common.check_choice(config.digits[key], tuple(range(10)), f"digits.{key}")
    if config.digits.positive == config.digits.negative:
        raise common.ConfigError("config.digits.positive and config.digits.negative must be two "
                                 "different digits (0..9).")
    syn = config.synthetic
    if isinstance(syn.n, int) and syn.n < 1:
        raise common.ConfigError(f"config.synthetic.n={syn.n} gives an empty dataset; need n >= 1.")
    _check_int(syn.n, "synthetic.n", 1)
    _check_int(syn.d, "synthetic.d", 2)
    common.check_positive(syn.radius, "synthetic.radius")
    common.check_positive(syn.mu, "synthetic.mu")
    if not syn.mu < syn.radius:
        raise common.ConfigError(f"config.synthetic.mu={syn.mu} must be < config.synthetic.radius"
                                 f"={syn.radius} (the margin cannot exceed the radius).")
    if not 0 <= syn.spread <= 1:
        raise common.ConfigError(f"config.synthetic.spread={syn.spread} must be in [0, 1].")
    _check_int(config.worst_case.n, "worst_case.n", 2)
    if not config.worst_case.sizes:
        raise common.ConfigError("config.worst_case.sizes must be a non-empty tuple of n >= 2.")
    for i, n in enumerate(config.worst_case.sizes):
        _check_int(n, f"worst_case.sizes[{i}]", 2)


def _first(separated) -> int:
    return int(logistic.iterations_to_separate(separated))


def _iters(separated) -> list[int]:
    return [int(v) for v in logistic.iterations_to_separate(separated)]


def _cell(iterations: int, horizon: int) -> Any:
    return iterations if iterations >= 0 else f"> {horizon}"


def _dataset_rows(name, ds, gammas, normalized_gammas, limit_gammas, num_steps, max_epochs,
                  dtype):
    """Table 1 rows and traces for one dataset: LR+GD over ``gammas`` and ``limit_gammas``,
    Normalized LR+GD over ``normalized_gammas`` (one compiled sweep), Batch / Normalized Batch
    Perceptron (one compiled sweep) and the classical Perceptron."""
    x = np.asarray(ds.features, dtype)
    y = np.asarray(ds.labels, dtype)
    groups = (("LR+GD", gammas), ("Normalized LR+GD", normalized_gammas), ("limit", limit_gammas))
    all_gammas = np.concatenate([np.asarray(g, np.float64) for _, g in groups])
    rules = sum((["normalized" if m == "Normalized LR+GD" else "constant"] * len(g)
                 for m, g in groups), [])
    trace = _np(logistic.sweep(x, y, all_gammas, num_steps, rule=rules))
    batches = _np(perceptron.batch_perceptrons(x, y, num_steps))
    classic = _np(perceptron.perceptron(x, y, max_epochs=max_epochs))
    its = _iters(trace.separated)
    parts, start, rows = {}, 0, []
    for method, g in groups:
        sl = slice(start, start + len(g))
        parts[method] = jax.tree_util.tree_map(lambda v, sl=sl: v[sl], trace)
        if method != "limit":
            for gamma, i in zip(g, its[sl], strict=True):
                rows.append({"dataset": name, "method": method, "gamma": float(gamma),
                             "iterations": _cell(i, num_steps), "_its": i})
        start += len(g)
    batch = jax.tree_util.tree_map(lambda v: v[0], batches)
    for method, k in (("Batch Perceptron", 0), ("Normalized Batch Perceptron", 1)):
        i = _first(batches.separated[k])
        rows.append({"dataset": name, "method": method, "gamma": "inf",
                     "iterations": _cell(i, num_steps), "_its": i})
    i = int(classic.updates) if bool(classic.converged) else -1
    rows.append({"dataset": name, "method": "Perceptron (one-sample, updates)", "gamma": "-",
                 "iterations": _cell(i, f"{max_epochs} epochs"), "_its": i})
    return rows, parts, batch


def _fig1(plt, trace, batch, gammas, title):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    steps = np.arange(trace.loss.shape[1])
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(gammas)))
    for g, gamma in enumerate(gammas):
        kw = {"color": colors[g], "lw": 1, "label": f"LR+GD, gamma={gamma:g}"}
        axes[0].plot(steps, np.asarray(trace.accuracy[g]), **kw)
        axes[1].semilogy(steps, np.maximum(np.asarray(trace.loss[g]), 1e-300), **kw)
        axes[2].semilogy(steps, np.maximum(np.asarray(trace.grad_norm[g]), 1e-300), **kw)
    axes[0].plot(steps, np.asarray(batch.accuracy), "r--", lw=1.2, label="Batch Perceptron")
    for ax, label in zip(axes, ("accuracy", "logistic loss f(theta_t)", "||grad f(theta_t)||"),
                         strict=True):
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlabel("iteration t")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    validate(config)
    x64 = config.dtype == "float64"
    with jax.enable_x64(x64):
        return _run(config, workdir, np.float64 if x64 else np.float32)


def _run(config, workdir, dtype) -> dict:
    plt = common.pyplot()
    gammas = np.asarray(config.gammas, np.float64)
    limit = np.asarray(config.limit_gammas, np.float64)
    wc = config.worst_case
    checks: dict[str, Any] = {}
    try:
        digits = separable.digits_pair(config.digits.positive, config.digits.negative)
        syn = config.synthetic
        synthetic = separable.planted(syn.n, syn.d, mu=syn.mu, radius_bound=syn.radius,
                                      spread=syn.spread, seed=syn.seed)
        separable.check_separable(synthetic.features, synthetic.labels)
    except ValueError as e:
        raise common.ConfigError(str(e)) from e
    worst = separable.worst_case(wc.n)

    # ---- per dataset: Table 1 rows, Thm 3.2 distances, bounds, Fig. 1 --------------------------
    table, worst_rows, bounds, thm32, fig1 = [], [], [], [], {}
    studies = (("worst case", worst, wc.gammas, wc.normalized_gammas, wc.num_steps),
               ("digits", digits, gammas, gammas, config.num_steps),
               ("synthetic", synthetic, gammas, gammas, config.num_steps))
    for name, ds, g_plain, g_norm, steps in studies:
        rows, parts, batch = _dataset_rows(f"{name}: {ds.name}", ds, g_plain, g_norm, limit,
                                           steps, config.classical_max_epochs, dtype)
        bounds.append(_bounds_row(name, ds, rows, g_norm, steps))
        # Thm 3.2 holds for each fixed t; compare up to the Batch Perceptron's separation time
        # (afterwards it stops while LR+GD keeps drifting by O(sigma(-gamma * delta)) per step).
        t_hat = _first(batch.separated)
        horizon = t_hat if t_hat > 0 else steps
        dist = logistic.scaled_distance(parts["limit"].params[:, :horizon + 1], limit,
                                        batch.params[:horizon + 1])
        first = logistic.scaled_distance(parts["limit"].params[:, 1:2], limit, batch.params[1:2])
        z = ds.labels[:, None] * ds.features
        delta = float(np.min(np.abs(batch.params[1:horizon + 1] @ z.T)))
        lim_its = _iters(parts["limit"].separated)
        for gamma, d, f, i in zip(limit, dist, first, lim_its, strict=True):
            thm32.append({"dataset": name, "horizon T": horizon, "delta": delta, "gamma": gamma,
                          "gamma*delta": gamma * delta, "max_t distance": float(d),
                          "step-1 distance": float(f), "LR+GD iterations": i,
                          "Batch Perceptron iterations": t_hat})
        key = name.replace(" ", "_")
        checks[f"thm32_{key}_distances"] = [float(d) for d in dist]
        checks[f"thm32_{key}_monotone"] = bool(np.all(np.diff(dist) <= 0))
        checks[f"thm32_{key}_delta"] = delta
        checks[f"thm32_{key}_step1_max_distance"] = float(np.max(first))
        # Without the first step's 1/2 the step-1 distance would be ||mean_i z_i|| / 2 instead.
        checks[f"thm32_{key}_step1_distance_without_half"] = float(
            np.linalg.norm(parts["limit"].params[-1, 1] / limit[-1] - z.mean(axis=0)))
        if name == "worst case":
            for row in rows:
                paper = PAPER_TABLE1.get((row["method"], row["gamma"])) if wc.n == 1000 else None
                row["paper (n=1000)"] = paper if paper is not None else ""
            worst_rows = rows
        else:
            table += rows
            fig1[name] = (parts["LR+GD"], parts["Normalized LR+GD"], batch)
            common.savefig(_fig1(plt, parts["LR+GD"], batch, gammas,
                                 f"Fig. 1 analogue: LR+GD on {ds.name}, n={len(ds.labels)}"),
                           workdir, f"fig1_{name}")
    table = worst_rows + table
    ours = {(r["method"], r["gamma"]): r["_its"] for r in worst_rows}
    checks["table1_worst_case"] = {f"{m} gamma={g:g}": ours.get((m, g)) for m, g in PAPER_TABLE1}
    if wc.n == 1000:
        checks["table1_worst_case_matches_paper"] = all(
            ours.get(k) == v for k, v in PAPER_TABLE1.items())
    columns = ["dataset", "method", "gamma", "iterations", "paper (n=1000)"]
    common.write_table(workdir, "table1", table, columns,
                       title="Table 1 analogue: iterations until y_i a_i^T theta_t > 0 for all i")
    common.write_table(workdir, "thm32", thm32, digits=3, title="Thm 3.2: max over t <= T of "
                       "||theta_t/gamma - theta_hat_t|| (theta_hat: Batch Perceptron, T: its "
                       "separation time; delta = min over 1 <= t <= T and i of "
                       "|y_i a_i^T theta_hat_t|)")

    # ---- Thm 4.1: the two-point example --------------------------------------------------------
    tp = separable.two_point()
    tg = np.asarray(config.two_point_gammas, np.float64)
    tr = _np(logistic.sweep(np.asarray(tp.features, dtype), np.asarray(tp.labels, dtype), tg, 2))
    thm41 = []
    for g, gamma in enumerate(tg):
        closed = logistic.two_point_first_loss(gamma)
        t2 = np.asarray(tr.params[g, 2], np.float64) / gamma
        thm41.append({"gamma": gamma, "f(theta_1)": float(tr.loss[g, 1]),
                      "closed form f(theta_1)": float(closed), "f(theta_2)": float(tr.loss[g, 2]),
                      "theta_2/gamma": f"({t2[0]:.6g}, {t2[1]:.6g})",
                      "||grad f(theta_1)||": float(tr.grad_norm[g, 1]),
                      "||grad f(theta_2)||": float(tr.grad_norm[g, 2]),
                      "separated at t=1": bool(tr.separated[g, 1]),
                      "separated at t=2": bool(tr.separated[g, 2])})
    checks["thm41_loss1_increasing_in_gamma"] = bool(np.all(np.diff(np.asarray(tr.loss[:, 1])) > 0))
    checks["thm41_separated_at_step2"] = [bool(v) for v in tr.separated[:, 2]]
    checks["thm41_not_separated_at_step1"] = not bool(np.any(tr.separated[:, 1]))
    common.write_table(workdir, "thm41", thm41, title="Thm 4.1: two-point example", digits=6)

    # ---- Thms 3.3, 5.2, 5.3, 6.1: bounds ------------------------------------------------------
    checks["bounds_hold"] = {r["dataset"]: r["holds"] for r in bounds}
    common.write_table(workdir, "bounds", bounds, title="Iteration bounds (mu: certified lower "
                       "bound from lrx.data.separable.max_margin)", digits=4)

    # ---- Thm 5.1: iterations linear in n on the worst-case dataset -----------------------------
    growth = []
    for n in wc.sizes:
        ds = separable.worst_case(n)
        x, y = np.asarray(ds.features, dtype), np.asarray(ds.labels, dtype)
        horizon = max(wc.num_steps, (3 * n + 2) // 10 + 20)
        bp = _first(np.asarray(perceptron.batch_perceptrons(x, y, horizon).separated)[0])
        gd, ngd = _iters(logistic.sweep(x, y, [100.0, 100.0], horizon, keep_params=False,
                                        rule=["constant", "normalized"]).separated)
        growth.append({"n": n, "Batch Perceptron": bp, "closed form floor((3n+2)/10)+1":
                       perceptron.worst_case_iterations(n), "LR+GD gamma=100": gd,
                       "Normalized LR+GD gamma=100": ngd, "bound n R^2/mu^2 = 5n":
                       # the worst-case dataset's margin is 0.5 (lrx.data.separable.worst_case)
                       perceptron.batch_perceptron_bound(n, separable.radius(ds.features), 0.5)})
    ns = np.asarray([r["n"] for r in growth], np.float64)
    its = np.asarray([r["Batch Perceptron"] for r in growth], np.float64)
    slope, intercept = np.polyfit(ns, its, 1) if len(ns) > 1 else (math.nan, math.nan)
    checks["worst_case_closed_form_matches"] = all(
        r["Batch Perceptron"] == r["closed form floor((3n+2)/10)+1"] for r in growth)
    checks["worst_case_linear_fit"] = {"slope": float(slope), "intercept": float(intercept)}
    common.write_table(workdir, "worst_case_n", growth, title="Thm 5.1: iterations to separate "
                       f"the worst-case dataset vs n (least-squares slope {slope:.4f})")
    fig, ax = plt.subplots(figsize=(5, 4))
    for key, style in (("Batch Perceptron", "o-"), ("LR+GD gamma=100", "s--"),
                       ("Normalized LR+GD gamma=100", "^:")):
        ax.loglog(ns, [max(r[key], 0.5) for r in growth], style, label=key)
    ax.loglog(ns, 0.3 * ns, "k-", lw=0.6, label="0.3 n")
    ax.set_xlabel("n")
    ax.set_ylabel("iterations to separate")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    common.savefig(fig, workdir, "worst_case_n")

    # ---- Fig. 1 claims on digits ---------------------------------------------------------------
    for name, (plain, normal, _) in fig1.items():
        its = _iters(plain.separated)
        checks[f"fig1_{name}_lrgd_iterations"] = dict(zip(map(str, gammas), its, strict=True))
        checks[f"fig1_{name}_normalized_iterations"] = dict(
            zip(map(str, gammas), _iters(normal.separated), strict=True))
        order = np.argsort(gammas)
        ranked = [its[k] if its[k] >= 0 else math.inf for k in order]
        checks[f"fig1_{name}_iterations_nonincreasing_in_gamma"] = bool(
            all(a >= b for a, b in zip(ranked, ranked[1:], strict=False)))
        for t in _LOSS_AT:
            if t < plain.loss.shape[1]:
                checks[f"fig1_{name}_loss_at_t{t}"] = dict(
                    zip(map(str, gammas), map(float, plain.loss[:, t]), strict=True))
        # "Higher loss, yet faster": the largest gamma has the highest loss at t = 10 and needs
        # no more iterations than any other gamma.
        big, t10 = int(np.argmax(gammas)), min(10, plain.loss.shape[1] - 1)
        checks[f"fig1_{name}_largest_gamma_higher_loss_at_t10_yet_fastest"] = bool(
            plain.loss[big, t10] >= np.max(plain.loss[:, t10]) and its[big] >= 0
            and all(i < 0 or its[big] <= i for i in its))

    # ---- Wu, Bartlett, Telgarsky & Yu (COLT 2024): gamma = c T for a budget of T steps --------
    budget = _budget_study(plt, config.budget, digits, dtype, workdir, checks)

    summary = {"checks": checks,
               "table1": [{k: v for k, v in r.items() if not k.startswith("_")} for r in table],
               "thm32": thm32, "thm41": thm41, "bounds": bounds, "worst_case_n": growth,
               "budget": budget, "dtype": config.dtype}
    common.write_summary(workdir, summary)
    return {"checks": checks}


_LOSS_AT = (1, 10, 100)


def _budget_study(plt, cfg, ds, dtype, workdir, checks) -> list[dict]:
    """Loss after T steps of LR+GD with gamma = c * T (one sweep over all (c, T) pairs plus a
    constant-gamma baseline); log-log slopes of the final loss against T."""
    steps = np.asarray(cfg.steps, np.int64)
    scales = np.asarray(cfg.scales, np.float64)
    gammas = np.concatenate([np.outer(scales, steps).reshape(-1), [cfg.baseline_gamma]])
    trace = _np(logistic.sweep(np.asarray(ds.features, dtype), np.asarray(ds.labels, dtype),
                               gammas, int(steps.max()), keep_params=False))
    rows, curves = [], {}
    for k, c in enumerate(scales):
        losses = [float(trace.loss[k * len(steps) + j, t]) for j, t in enumerate(steps)]
        curves[f"gamma = {c:g} T"] = losses
    curves[f"gamma = {cfg.baseline_gamma:g} (constant)"] = [float(trace.loss[-1, t])
                                                            for t in steps]
    for label, losses in curves.items():
        ok = [(t, v) for t, v in zip(steps, losses, strict=True) if v > 0]
        slope = (float(np.polyfit(np.log([t for t, _ in ok]), np.log([v for _, v in ok]), 1)[0])
                 if len(ok) > 1 else math.nan)
        rows.append({"step size": label, **{f"T={t}": v for t, v in zip(steps, losses,
                                                                           strict=True)},
                     "log-log slope": slope})
    checks["budget_slopes"] = {r["step size"]: r["log-log slope"] for r in rows}
    common.write_table(workdir, "budget", rows, digits=3, title=f"Loss f(theta_T) after T steps, "
                       f"{ds.name} (Wu et al. COLT 2024: gamma = Theta(T) gives O~(1/T^2))")
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, losses in curves.items():
        ax.loglog(steps, np.maximum(losses, 1e-300), "o-", label=label)
    ax.set_xlabel("budget T")
    ax.set_ylabel("f(theta_T)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    common.savefig(fig, workdir, "budget")
    return rows


def _np(tree):
    """Device arrays -> NumPy (slicing NumPy arrays compiles nothing)."""
    return jax.tree_util.tree_map(np.asarray, tree)


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.inf


def _bounds_row(name, ds, rows, gammas, horizon) -> dict:
    """Bounds of Thms 3.3, 5.2, 5.3 and 6.1 against the measured iterations."""
    mu = separable.max_margin(ds.features, ds.labels).lower
    r2 = separable.radius(ds.features) ** 2
    n = len(ds.labels)
    its = {(r["method"], r["gamma"]): r["_its"] for r in rows}
    batch = its[("Batch Perceptron", "inf")]
    nbatch = its[("Normalized Batch Perceptron", "inf")]
    classic = its[("Perceptron (one-sample, updates)", "-")]
    radius = math.sqrt(r2)
    thm61 = {float(g): (its.get(("Normalized LR+GD", float(g)), -1),
                        logistic.normalized_gd_bound(n, radius, mu, float(g)))
             for g in gammas if ("Normalized LR+GD", float(g)) in its}
    # A run that did not separate within its horizon violates the bound only if the bound is
    # below the horizon.
    ok61 = all((0 <= i <= b) if i >= 0 else b >= horizon for i, b in thm61.values())
    batch_bound = perceptron.batch_perceptron_bound(n, radius, mu)
    bound = perceptron.perceptron_bound(radius, mu)
    holds = (0 <= batch <= batch_bound and 0 <= nbatch <= bound and 0 <= classic <= bound
             and ok61)
    worst61 = max(thm61.items(), key=lambda kv: kv[1][0]) if thm61 else (None, (-1, 0))
    return {"dataset": name, "n": n, "R": radius, "mu": mu,
            "Batch Perceptron": batch, "n R^2/mu^2": batch_bound,
            "Normalized Batch Perceptron": nbatch, "classical Perceptron updates": classic,
            "R^2/mu^2": bound,
            "Norm. LR+GD slowest gamma": worst61[0], "its": worst61[1][0],
            "Thm 6.1 bound": worst61[1][1], "holds": bool(holds)}
