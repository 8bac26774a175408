"""Shared pieces of the lrx.param tests: the factories under test and the NumPy float64
reference of each paper's dense weight (written independently of lrx)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import lrx.param as P

M, N = 12, 20


def f64(x):
    return np.asarray(x, dtype=np.float64)


def perturb(node, key=1):
    """Random values in every trainable field (so that formulas are tested away from init)."""
    fields = {name: getattr(node, name) for name, k in node.kinds.items() if k == "trainable"}
    keys = jax.random.split(jax.random.key(key), len(fields))
    new = {name: jax.random.normal(k, v.shape, v.dtype) * 0.3
           for k, (name, v) in zip(keys, fields.items(), strict=True)}
    if "magnitude" in new:
        new["magnitude"] = jnp.abs(new["magnitude"]) + 0.5
    return node.replace(**new)


def numpy_reference(node):
    """The dense weight from the paper's formula, in float64, written independently."""
    if isinstance(node, P.LowRank):
        return f64(node.u) @ f64(node.v)
    if isinstance(node, P.LoRA):
        return f64(node.base) + node.scale * f64(node.a) @ f64(node.b)
    if isinstance(node, P.DoRA):
        v = f64(node.base) + node.scale * f64(node.a) @ f64(node.b)
        return f64(node.magnitude)[None, :] * v / np.linalg.norm(v, axis=0, keepdims=True)
    if isinstance(node, P.SparsePlusLowRank):
        s = np.zeros(node.shape[0] * node.shape[1])
        s[np.asarray(node.indices)] = f64(node.values)
        return node.scale * f64(node.a) @ f64(node.b) + s.reshape(node.shape)
    if isinstance(node, P.NOLA):
        a0, ba, bb = (f64(t) for t in node.bases())
        a = a0 + sum(c * ba[i] for i, c in enumerate(f64(node.alpha)))
        b = sum(c * bb[j] for j, c in enumerate(f64(node.beta)))
        return f64(node.base) + node.scale * a @ b
    if isinstance(node, P.VeRA):
        a_full, b_full = (f64(t) for t in node.shared_bases())
        m, n = node.shape
        # torch layout: Lambda_b B Lambda_d A, (out, in); ours is its transpose.
        delta_torch = (np.diag(f64(node.lambda_b)) @ b_full[:n] @ np.diag(f64(node.lambda_d))
                       @ a_full[:, :m])
        return f64(node.base) + delta_torch.T
    if isinstance(node, P.RandLoRA):
        a_full, b_full = (f64(t) for t in node.shared_bases())
        m, n = node.shape
        small, big = min(m, n), max(m, n)
        lam, gam = f64(node.lam), f64(node.gamma)
        num = lam.shape[1]
        a = a_full[:, :small]
        # torch layout with the small side as "input": sum_n B_n Lambda_n A Gamma_n: (big, small)
        delta = sum(b_full[k, :big] @ np.diag(lam[:, k]) @ a @ np.diag(gam[k]) for k in range(num))
        delta_kernel = delta.T if m <= n else delta      # ours: (m, n)
        return f64(node.base) + node.scale * delta_kernel
    if isinstance(node, P.SoRA):
        return f64(node.base) + node.scale * (f64(node.a) * f64(node.gate)) @ f64(node.b)
    if isinstance(node, P.DyLoRA):
        r = int(node.active_rank)
        return f64(node.base) + node.alpha / r * f64(node.a)[:, :r] @ f64(node.b)[:r]
    raise TypeError(type(node))


FACTORIES = {
    "lowrank": lambda: P.lowrank(4),
    "lowrank_kaiming": lambda: P.lowrank(4, init="kaiming"),
    "lora": lambda: P.lora(4, alpha=8),
    "rslora": lambda: P.lora(4, alpha=8, rslora=True),
    "pissa": lambda: P.lora(4, alpha=8, init="pissa"),
    "olora": lambda: P.lora(4, alpha=8, init="olora"),
    "dora": lambda: P.dora(4, alpha=6),
    "sltrain": lambda: P.sltrain(4, alpha=2, density=0.1),
    "nola": lambda: P.nola(3, num_basis_a=7, num_basis_b=5, alpha=6),
    "randlora": lambda: P.randlora(5),
    "vera": lambda: P.vera(6),
    "sora": lambda: P.SoRAFactory(4, alpha=8),
    "dylora": lambda: P.DyLoRAFactory(4, alpha=8),
}


SEED_SCRIPT = """
import json, sys, jax, jax.numpy as jnp
import lrx.param as P
w = jnp.arange(12 * 20, dtype=jnp.float32).reshape(12, 20) / 100
out = {}
for name, f in [("nola", P.nola(3, 7, 5)), ("randlora", P.randlora(5)), ("vera", P.vera(6))]:
    node = f(jax.random.key(11), w)
    fields = {k: jnp.ones_like(getattr(node, k)) * 0.5 for k, v in node.kinds.items()
              if v == "trainable"}
    out[name] = jax.device_get(node.replace(**fields).materialize()).tolist()
print(json.dumps(out))
"""
