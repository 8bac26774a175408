"""S4 kernel study: correctness against float64 references and timing/memory of four ways to get the
SSM convolution kernel (S4, arXiv 2111.00396, Sec. 3.3 / Alg. 1; S4D, arXiv 2206.11893).

Correctness (``correctness.md``): HiPPO-LegS DPLR (N = ``N``, N/2 stored conjugate modes), random C,
for each step size and length: relative max error of the shared-Cauchy kernel (all nodes at once and
chunked), the four-separate-Cauchy kernel and naive float32 powering against
``lrx.ssm.power_kernel_f64`` (float64 powering of the dense bilinear matrix); the error if C were
used in place of C-tilde; and the convolution output vs the O(N) recurrence.

Timing (``timing.md``, ``timing.png``): forward kernel generation, jit-compiled, median of
``repeats`` runs after one warm-up, on the same machine in one run, for H channels x L:

    naive            lax.scan powering of the dense complex Abar, O(N^2 L) (N full modes)
    separate_full    4 separate Cauchy sums, N modes, all L nodes (Annotated-S4 style)
    separate_half    4 separate Cauchy sums, N/2 conjugate modes, L/2+1 nodes
    shared           one Cauchy matrix for the 4 numerators, N/2 modes, L/2+1 nodes (lrx default)
    shared_chunked   the same, nodes in chunks of ``chunk_size`` (bounded memory)
    s4d              S4D ZOH Vandermonde kernel, N/2 modes (materialised (N/2) x L)

Memory is XLA's ``compiled.memory_analysis().temp_size_in_bytes`` (peak temporaries of the
compiled program). The summary states, for ``shared`` and ``shared_chunked``, whether the speed-up
over naive at the largest H and L reaches ``target_speedup`` (issue: >= 8x at H=64, L=16k).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import common

VARIANTS = ("naive", "separate_full", "separate_half", "shared", "shared_chunked", "s4d")
log = logging.getLogger("lrx.bench_s4")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "bench_s4"
    c.seed = 0
    c.N = 64
    c.hs = (1, 64)
    c.lengths = (1024, 4096, 16384)
    c.variants = VARIANTS
    c.chunk_size = 1024
    c.repeats = 3
    c.target_speedup = 8.0
    c.correctness = ml_collections.ConfigDict(dict(
        steps=(0.001, 0.01, 0.1), lengths=(1024, 4096, 16384), recurrence_length=4096))
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    common.check_keys(config, defaults())
    common.check_positive(config.N, "N")
    if config.N % 2:
        raise common.ConfigError(f"config.N={config.N} must be even (conjugate pairs).")
    for v in config.variants:
        common.check_choice(v, VARIANTS, "variants")
    for key in ("chunk_size", "repeats", "target_speedup"):
        common.check_positive(config[key], key)
    for h in config.hs:
        common.check_positive(h, "hs")
    for L in list(config.lengths) + list(config.correctness.lengths):
        common.check_positive(L, "lengths")
    for s in config.correctness.steps:
        common.check_positive(s, "correctness.steps")


def _system(N: int, H: int, seed: int):
    """HiPPO-LegS DPLR half system tiled over H channels, random C, log-spaced steps."""
    import lrx.ssm as ssm

    Lam, P, B, _ = ssm.legs_dplr(N)
    n = N // 2
    rng = np.random.default_rng(seed)
    C = (rng.normal(size=(H, n)) + 1j * rng.normal(size=(H, n))) / np.sqrt(2)
    steps = np.exp(np.linspace(np.log(1e-3), np.log(1e-1), H)) if H > 1 else np.array([0.01])
    tile = lambda x: np.tile(x[None, :n], (H, 1))  # noqa: E731
    return tile(Lam), tile(P), tile(B), C, steps


def _variant_fn(name: str, L: int, chunk_size: int):
    import lrx.ssm as ssm

    def naive(lam, p, b, c, step):
        full = [ssm.expand_conj(x) for x in (lam, p, b, c)]
        Abar, Bbar = ssm.discretize_bilinear(full[0], full[1], full[1], full[2], step)
        return ssm.krylov_kernel(Abar, Bbar, full[3], L)

    def separate_full(lam, p, b, c, step):
        full = [ssm.expand_conj(x) for x in (lam, p, b, c)]
        return ssm.dplr_kernel_separate(full[0], full[1], full[1], full[2], full[3], step, L)

    fns = {
        "naive": naive,
        "separate_full": separate_full,
        "separate_half": lambda lam, p, b, c, s: ssm.dplr_kernel_separate(lam, p, p, b, c, s, L,
                                                                           True),
        "shared": lambda lam, p, b, c, s: ssm.dplr_kernel(lam, p, p, b, c, s, L, True),
        "shared_chunked": lambda lam, p, b, c, s: ssm.dplr_kernel(lam, p, p, b, c, s, L, True,
                                                                  chunk_size=chunk_size),
        "s4d": lambda lam, p, b, c, s: ssm.s4d_kernel(lam, b, c, s, L, "zoh", conj_sym=True),
    }
    return fns[name]


def _time(fn, args, repeats: int) -> tuple[float, float, float]:
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = float(getattr(mem, "temp_size_in_bytes", float("nan"))) if mem is not None else np.nan
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), temp, compile_s


def _correctness(config) -> list[dict[str, Any]]:
    import lrx.ssm as ssm
    from lrx.models.s4 import causal_conv

    N, n = config.N, config.N // 2
    Lam, P, B, _ = ssm.legs_dplr(N)
    rng = np.random.default_rng(config.seed)
    c = rng.normal(size=n) + 1j * rng.normal(size=n)
    C = np.concatenate([c, c.conj()])
    rows = []
    for step in config.correctness.steps:
        for L in config.correctness.lengths:
            K_ref = ssm.power_kernel_f64(Lam, P, P, B, C, step, L)
            Ct = ssm.ctilde_f64(Lam, P, P, B, C, step, L)
            err = lambda K, ref=K_ref: ssm.relative_max_error(K, ref)  # noqa: E731
            h = lambda x: x[:n]  # noqa: E731
            row = dict(step=step, L=L,
                       abar_L_norm=ssm.abar_power_norm_f64(Lam, P, P, B, step, L),
                       shared=err(ssm.dplr_kernel(h(Lam), h(P), h(P), h(B), h(Ct), step, L, True)),
                       shared_chunked=err(ssm.dplr_kernel(h(Lam), h(P), h(P), h(B), h(Ct), step,
                                                          L, True, chunk_size=config.chunk_size)),
                       separate_half=err(ssm.dplr_kernel_separate(h(Lam), h(P), h(P), h(B), h(Ct),
                                                                  step, L, True)),
                       naive_fp32=err(_variant_fn("naive", L, 0)(
                           h(Lam), h(P), h(B), h(C), jnp.asarray(step))),
                       without_ctilde=err(ssm.dplr_kernel(h(Lam), h(P), h(P), h(B), h(C), step, L,
                                                          True)))
            if L == config.correctness.recurrence_length:
                u = jnp.asarray(rng.normal(size=L), jnp.float32)
                K = ssm.dplr_kernel(h(Lam), h(P), h(P), h(B), h(Ct), step, L, True)
                y_conv = np.asarray(causal_conv(u, K))
                params = ssm.dplr_step_params(h(Lam), h(P), h(P), h(B), h(Ct), step, L, True)
                y_rec, _ = jax.jit(lambda pp, uu: ssm.scan(pp, uu, True))(params, u)
                row["conv_vs_recurrence"] = ssm.relative_max_error(y_rec, y_conv)
            rows.append(row)
            log.info("correctness %s", row)
    return rows


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    validate(config)
    correctness = _correctness(config)
    common.write_table(workdir, "correctness", correctness, digits=2,
                       title=f"Kernel relative max error vs float64 powering (N={config.N})")
    rows = []
    for H in config.hs:
        lam, p, b, c, steps = _system(config.N, H, config.seed)
        args = [jnp.asarray(x, jnp.complex64) for x in (lam, p, b, c)] + \
            [jnp.asarray(steps, jnp.float32)]
        for L in config.lengths:
            for name in config.variants:
                ms, temp, compile_s = _time(_variant_fn(name, L, config.chunk_size), args,
                                            config.repeats)
                row = dict(H=H, L=L, variant=name, ms=1e3 * ms, temp_MiB=temp / 2 ** 20,
                           compile_s=compile_s)
                rows.append(row)
                log.info("timing %s", row)
    by = {(r["H"], r["L"], r["variant"]): r for r in rows}
    for r in rows:
        naive = by.get((r["H"], r["L"], "naive"))
        r["speedup_vs_naive"] = naive["ms"] / r["ms"] if naive else float("nan")
    common.write_table(workdir, "timing", rows, digits=3,
                       title=f"Kernel generation, N={config.N}, median of {config.repeats} "
                             f"({jax.devices()[0].device_kind}, {jax.device_count()} device)")
    H, L = max(config.hs), max(config.lengths)
    target: dict[str, Any] = dict(H=H, L=L, required=config.target_speedup)
    if (H, L, "naive") in by:
        for name in ("shared", "shared_chunked"):
            if (H, L, name) in by:
                target[f"speedup_{name}"] = by[(H, L, "naive")]["ms"] / by[(H, L, name)]["ms"]
                target[f"temp_MiB_{name}"] = by[(H, L, name)]["temp_MiB"]
        for name in ("shared", "shared_chunked"):
            if f"speedup_{name}" in target:
                target[f"met_{name}"] = bool(target[f"speedup_{name}"] >= config.target_speedup)
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(config.hs), figsize=(5 * len(config.hs), 3.5), squeeze=False)
    for ax, Hh in zip(axes[0], config.hs, strict=True):
        for name in config.variants:
            pts = [(r["L"], r["ms"]) for r in rows if r["H"] == Hh and r["variant"] == name]
            ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("L")
        ax.set_ylabel("ms (forward kernel)")
        ax.set_title(f"H={Hh}, N={config.N}")
        ax.legend(fontsize=7)
    common.savefig(fig, workdir, "timing")
    summary = dict(correctness=correctness, timing=rows, target=target,
                   device=jax.devices()[0].device_kind)
    common.write_summary(workdir, summary)
    return summary
