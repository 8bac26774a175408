"""Independent NumPy float64 re-derivations of GaLore, Fira and FRUGAL (written from the papers
and the official code's documented semantics, not from lrx).

Every reference works on the **PyTorch layout** ``(out, in)`` that the official code sees and
applies the official side rule to it (``shape[0] >= shape[1]`` -> right projector ``Vh[:r]`` for
``std``).
A Flax ``(in, out)`` kernel is handled by transposing into the PyTorch layout, running the official
rule there and transposing the result back (``layout='flax'``).
"""

from __future__ import annotations

import functools

import numpy as np


def side_for(m: int, n: int, proj_type: str) -> str:
    """GaLore's official side table for a PyTorch ``(out, in) = (m, n)`` weight."""
    if proj_type in ("left", "right", "full"):
        return proj_type
    if proj_type == "std":
        return "right" if m >= n else "left"
    return "left" if m >= n else "right"


def torch_layout(fn):
    """Run ``fn`` (written for PyTorch ``(out, in)`` weights) on Flax ``(in, out)`` kernels when
    called with ``layout='flax'``: weights and gradients are transposed in and the result out.
    ``proj_type`` is always the official name for the PyTorch weight (``left`` = ``U[:, :r]`` over
    the output dimension)."""

    @functools.wraps(fn)
    def wrapped(w, grads, *, layout="torch", **kw):
        if layout == "torch":
            return fn(w, grads, **kw)
        assert layout == "flax", layout
        out = fn(np.asarray(w).T, [np.asarray(g).T for g in grads], **kw)
        return out.T

    return wrapped


def _flip(x):
    idx = np.argmax(np.abs(x), axis=0)
    return x * np.sign(x[idx, np.arange(x.shape[1])])


def top_vectors(g, r, side):
    """(P m x r or None, Q n x r or None) from the float64 SVD of g, largest entry positive."""
    u, _, vh = np.linalg.svd(g, full_matrices=False)
    p = _flip(u[:, :r]) if side in ("left", "full") else None
    q = _flip(vh[:r].T) if side in ("right", "full") else None
    return p, q


def down(g, p, q):
    if p is not None:
        g = p.T @ g
    if q is not None:
        g = g @ q
    return g


def up(r, p, q):
    if p is not None:
        r = p @ r
    if q is not None:
        r = r @ q.T
    return r


@torch_layout
def galore(w, grads, *, rank, gap, scale, proj_type, lr, wd=0.0, b1=0.9, b2=0.999, eps=1e-6,
           moments="keep", offset=0):
    """Weights after GaLore-AdamW on the given gradient sequence (one matrix); the projector is
    refreshed at ``t == 0`` and whenever ``t % gap == offset`` (``offset`` > 0: staggering)."""
    w = np.array(w, np.float64)
    m, n = w.shape
    side = side_for(m, n, proj_type)
    r = min(rank, m, n)
    mu = nu = p = q = None
    c = 0
    for t, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        if t == 0 or t % gap == offset:
            p_new, q_new = top_vectors(g, r, side)
            if mu is not None and moments == "reset":
                mu, nu, c = np.zeros_like(mu), np.zeros_like(nu), 0
            if mu is not None and moments == "project":
                if p_new is not None:
                    cm = p_new.T @ p
                    mu, nu = cm @ mu, (cm ** 2) @ nu
                if q_new is not None:
                    cm = q.T @ q_new
                    mu, nu = mu @ cm, nu @ (cm ** 2)
            p, q = p_new, q_new
        rr = down(g, p, q)
        if mu is None:
            mu, nu = np.zeros_like(rr), np.zeros_like(rr)
        c += 1
        mu = b1 * mu + (1 - b1) * rr
        nu = b2 * nu + (1 - b2) * rr * rr
        step = lr * np.sqrt(1 - b2 ** c) / (1 - b1 ** c)
        w = w - step * scale * up(mu / (np.sqrt(nu) + eps), p, q)
        w = w - lr * wd * w
    return w


def adamw_galore_style(w, grads, *, lr, wd=0.0, b1=0.9, b2=0.999, eps=1e-6):
    """The transformers AdamW of the official GaLore/Fira code on an unprojected leaf."""
    w = np.array(w, np.float64)
    mu = np.zeros_like(w)
    nu = np.zeros_like(w)
    for k, g in enumerate(grads, start=1):
        mu = b1 * mu + (1 - b1) * g
        nu = b2 * nu + (1 - b2) * g * g
        w = w - lr * np.sqrt(1 - b2 ** k) / (1 - b1 ** k) * mu / (np.sqrt(nu) + eps)
        w = w - lr * wd * w
    return w


@torch_layout
def fira(w, grads, *, rank, gap, scale, proj_type, lr, gamma=1.01, residual="official", wd=0.0,
         b1=0.9, b2=0.999, eps=1e-6):
    """Weights after Fira-AdamW (φ, residual, limiter) on the gradient sequence."""
    w = np.array(w, np.float64)
    m, n = w.shape
    side = side_for(m, n, proj_type)
    r = min(rank, m, n)
    mu = nu = p = q = None
    prev = None
    for t, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        if t % gap == 0:
            p, q = top_vectors(g, r, side)
        rr = down(g, p, q)
        if mu is None:
            mu, nu = np.zeros_like(rr), np.zeros_like(rr)
        k = t + 1
        mu = b1 * mu + (1 - b1) * rr
        nu = b2 * nu + (1 - b2) * rr * rr
        psi = mu / (np.sqrt(nu) + eps)
        axis = 0 if rr.shape[0] < rr.shape[1] else 1          # the official norm_dim rule
        phi = np.linalg.norm(psi, axis=axis) / (np.linalg.norm(rr, axis=axis) + 1e-8)
        alpha = scale if residual == "official" else 1.0
        s = g - alpha * up(rr, p, q)
        s = s * (phi[None, :] if axis == 0 else phi[:, None])
        norm = np.linalg.norm(s)
        if prev is None:
            prev = norm
        else:
            lim = max(norm / (prev + 1e-8), gamma) / gamma
            s = s / lim
            prev = norm / lim
        f = np.sqrt(1 - b2 ** k) / (1 - b1 ** k)
        w = w - lr * f * (scale * up(psi, p, q) + s)
        w = w - lr * wd * w
    return w


@torch_layout
def frugal_svd(w, grads, *, density, gap, lr, proj_type="std", state_free="signsgd",
               free_scale=1.0, reset=True, wd=0.0, b1=0.9, b2=0.999, eps=1e-8):
    """Weights after FRUGAL (SVD subspace, torch AdamW state-full part, signSGD/SGD rest)."""
    w = np.array(w, np.float64)
    m, n = w.shape
    side = side_for(m, n, proj_type)
    r = round((n if side == "right" else m) * density)
    mu = nu = p = q = None
    c = 0
    for t, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        if t % gap == 0:
            p, q = top_vectors(g, r, side)
            if reset or mu is None:
                mu = nu = None
                c = 0
        rr = down(g, p, q)
        if mu is None:
            mu, nu = np.zeros_like(rr), np.zeros_like(rr)
        c += 1
        mu = b1 * mu + (1 - b1) * rr
        nu = b2 * nu + (1 - b2) * rr * rr
        step = (mu / (1 - b1 ** c)) / (np.sqrt(nu) / np.sqrt(1 - b2 ** c) + eps)
        free = g - up(rr, p, q)
        w = w * (1 - lr * wd)
        w = w - lr * up(step, p, q)
        if state_free == "signsgd":
            w = w - lr * free_scale * np.sign(free)
        elif state_free == "sgd":
            w = w - lr * free_scale * free
    return w


def frugal_blocks_descending(ws, grads, *, density, gap, lr, free_scale=1.0, b1=0.9, b2=0.999,
                             eps=1e-8, reset=True):
    """FRUGAL blockwise (descending order) over a list of matrices ``ws`` given in model order;
    grads[t][i]. Inactive blocks hold no state; a block that becomes active starts a fresh Adam
    state (step 0); with ``reset`` every refresh restarts the state of every active block."""
    ws = [np.array(w, np.float64) for w in ws]
    total = len(ws)
    n_active = round(total * density)
    start = total - 1
    active = set()
    mus = [np.zeros_like(w) for w in ws]
    nus = [np.zeros_like(w) for w in ws]
    cs = [0] * total
    for t, gs in enumerate(grads):
        if t % gap == 0:
            new_active = {(start - j) % total for j in range(n_active)}
            start -= n_active
            if start < 0:
                start += total
            for i in range(total):
                if i not in new_active or reset or i not in active:
                    mus[i], nus[i], cs[i] = np.zeros_like(ws[i]), np.zeros_like(ws[i]), 0
            active = new_active
        for i, g in enumerate(gs):
            g = np.asarray(g, np.float64)
            if i in active:
                cs[i] += 1
                c = cs[i]
                mus[i] = b1 * mus[i] + (1 - b1) * g
                nus[i] = b2 * nus[i] + (1 - b2) * g * g
                step = (mus[i] / (1 - b1 ** c)) / (np.sqrt(nus[i]) / np.sqrt(1 - b2 ** c) + eps)
                ws[i] = ws[i] - lr * step
            else:
                ws[i] = ws[i] - lr * free_scale * np.sign(g)
    return ws


@torch_layout
def apollo(w, grads, *, orthos, lr, scale_type, scale, proj_type="std", wd=0.0, b1=0.9,
           b2=0.999, eps=1e-6, gamma=1.01, limiter=True):
    """Weights after APOLLO-AdamW (official ``apollo_torch``) on a PyTorch ``(out, in)`` weight.

    ``orthos[t]`` is the official ``ortho_matrix`` used at step ``t``: ``(out, r)`` for a left
    projection (``R = oᵀ G``), ``(r, in)`` for a right one (``R = G oᵀ``); the side comes from the
    official rule (``side_for``), and the given matrix must have that side's shape."""
    w = np.array(w, np.float64)
    out_dim, in_dim = w.shape
    side = side_for(out_dim, in_dim, proj_type)
    mu = nu = prev = None
    for t, (g, o) in enumerate(zip(grads, orthos, strict=True)):
        g, o = np.asarray(g, np.float64), np.asarray(o, np.float64)
        if side == "right":
            assert o.shape[1] == in_dim, (o.shape, w.shape)
            rr = g @ o.T
        else:
            assert o.shape[0] == out_dim, (o.shape, w.shape)
            rr = o.T @ g
        if mu is None:
            mu, nu = np.zeros_like(rr), np.zeros_like(rr)
        k = t + 1
        mu = b1 * mu + (1 - b1) * rr
        nu = b2 * nu + (1 - b2) * rr * rr
        f = np.sqrt(1 - b2 ** k) / (1 - b1 ** k)
        psi = mu / (np.sqrt(nu) + eps)
        if scale_type == "channel":
            norm_dim = 1 if side == "right" else 0          # the rank axis of R
            if proj_type == "std":                          # the official rule (std only)
                assert norm_dim == (0 if g.shape[0] < g.shape[1] else 1)
            fac = np.linalg.norm(psi, axis=norm_dim) / (np.linalg.norm(rr, axis=norm_dim) + 1e-8)
            fac = fac[:, None] if norm_dim == 1 else fac[None, :]
        else:
            fac = np.linalg.norm(psi) / (np.linalg.norm(rr) + 1e-8)
        s = g * fac
        if limiter:
            norm = np.linalg.norm(s)
            if prev is None:
                prev = norm
            else:
                lim = max(norm / (prev + 1e-8), gamma) / gamma
                s = s / lim
                prev = norm / lim
        s = s * np.sqrt(scale)
        w = w - lr * f * s
        w = w - lr * wd * w
    return w
