"""S4 / S4D layers and a small sequence model in flax linen.

References: S4 (A. Gu, K. Goel, C. Re, arXiv 2111.00396, Sec. 3.4 "architecture details": H
independent SISO SSMs, log-step, D skip, position-wise output mixing); S4D (arXiv 2206.11893).

S4Layer maps ``u (batch, L, H) -> (batch, L, H)``:

    K = dplr_kernel(...) or s4d_kernel(...)   (H, L)   -- conj_sym with N/2 stored modes
    y = causal_conv(u, K) + D u                          -- FFT, zero-padded to 2L
    y = GELU(y);  out = GLU(Dense_2H(y))  or  Dense_H(y)

Parameters (complex ones stored as real pairs ``(..., 2)`` = (real, imag), so optax and weight decay
see real arrays): ``log_Lambda_real`` and ``Lambda_imag`` (``Re Lambda = -exp(log_Lambda_real)``
keeps the SSM stable, as the official ``real_transform='exp'``), ``P`` (DPLR only; tied ``Q = P``),
``B``, ``C`` (the trained C-tilde for DPLR; the plain C for S4D), ``D``, ``log_step`` (uniform in
``[log dt_min, log dt_max]``, one per channel). Lambda, P, B are initialised identically for all H
channels (HiPPO-LegS DPLR or an S4D init). Initialisation follows the official state-spaces/s4
code: C ~ CN(0, 1) (``torch.randn(..., dtype=torch.cfloat)``, E|C|^2 = 1); for DPLR the stored
C-tilde is ``C (I - Abar^L)`` with ``L = l_max`` (or the length of the init input), which
``SSMKernelDPLR._setup_C`` computes at its first forward; ``D ~ N(0, 1)``
(``nn.Parameter(torch.randn(channels, H))`` in the official block).

Optimiser: :func:`ssm_labels` labels Lambda, P, B and log_step ``'ssm'`` (everything else
``'default'``); :func:`s4_optimizer` gives them Adam with learning rate 1e-3 and no weight decay
(both anchors' recipe) and AdamW to the rest, through ``optax.multi_transform``.

Bidirectional: a second C (``C_reverse``) gives an anti-causal kernel ``K2`` and
``y_t = sum_{s<=t} K[t-s] u_s + sum_{s>t} K2[s-t-1] u_s`` (the reverse part is strictly
anti-causal, so ``D u`` is counted once); implemented as one circular FFT convolution of length 2L
whose kernel ``[K, 0, flip(K2[:L-1])]`` has the same layout as state-spaces/s4's bidirectional
padding (checked against a direct two-sided sum in the tests).

Autoregressive mode (``decode=True``): inputs ``(batch, 1, H)``; the state ``(batch, H, N/2)`` and
the stepping output matrix ``C = Ct (I - Abar^l_max)^-1`` live in the ``'cache'`` collection. Start
every generation with a fresh cache (apply with ``mutable=['cache']`` and no ``'cache'`` given, so
C is recovered from the current parameters); pass the returned cache to later steps. The DPLR step
is the O(N) Woodbury form of :mod:`lrx.ssm.recurrent`. Deviations from the official layer: no
dropout, LayerNorm only (BatchNorm would break stepping), no Im(B) clipping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from lrx import ssm

MODES = ("dplr", "diag")
ACTIVATIONS = ("glu", "gelu")
POOLS = ("mean", "last", "none")
SSM_PARAMS = ("log_Lambda_real", "Lambda_imag", "P", "B", "log_step")


def _pair(x: np.ndarray) -> np.ndarray:
    return np.stack([np.real(x), np.imag(x)], -1).astype(np.float32)


def _complex(x: jax.Array) -> jax.Array:
    return jax.lax.complex(x[..., 0], x[..., 1])


def causal_conv(u: jax.Array, K: jax.Array) -> jax.Array:
    """``y[..., t] = sum_{s<=t} K[..., t-s] u[..., s]`` by FFT. ``u (..., L)``, ``K (..., L)``."""
    L = u.shape[-1]
    y = jnp.fft.irfft(jnp.fft.rfft(u, 2 * L) * jnp.fft.rfft(K, 2 * L), 2 * L)
    return y[..., :L]


def bidirectional_conv(u: jax.Array, K: jax.Array, K_reverse: jax.Array) -> jax.Array:
    """``y_t = sum_{s<=t} K[t-s] u_s + sum_{s>t} K_reverse[s-t-1] u_s`` (one 2L circular FFT)."""
    L = u.shape[-1]
    zero = jnp.zeros(K.shape[:-1] + (1,), K.dtype)
    k = jnp.concatenate([K, zero, jnp.flip(K_reverse[..., : L - 1], -1)], -1)
    return jnp.fft.irfft(jnp.fft.rfft(u, 2 * L) * jnp.fft.rfft(k, 2 * L), 2 * L)[..., :L]


class S4Layer(nn.Module):
    """One S4 (``mode='dplr'``) or S4D (``mode='diag'``) block body: ``(batch, L, H) -> same``.

    Attributes:
      d_state: full state size N (even; N/2 conjugate modes are stored).
      mode: ``'dplr'`` (HiPPO-LegS + rank-1 correction) or ``'diag'`` (S4D).
      ssm_init: S4D init (``'legs'``, ``'lin'``, ``'inv'``, ``'random'``); DPLR requires ``'legs'``.
      disc: S4D discretisation ``'zoh'`` or ``'bilinear'`` (DPLR is always bilinear).
      dt_min, dt_max: range of the log-uniform step init.
      bidirectional: add an anti-causal kernel (not with ``decode``).
      activation: ``'glu'`` (GELU, Dense 2H, GLU) or ``'gelu'`` (GELU, Dense H).
      chunk_size: frequency-node chunk of the DPLR kernel (None: all at once).
      l_max: length the C-tilde parameter refers to, needed by ``decode``.
      decode: autoregressive step mode with a cache (inputs ``(batch, 1, H)``).
    """

    d_state: int = 64
    mode: str = "dplr"
    ssm_init: str = "legs"
    disc: str = "zoh"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    bidirectional: bool = False
    activation: str = "glu"
    chunk_size: int | None = None
    l_max: int | None = None
    decode: bool = False

    def _check(self) -> None:
        N = self.d_state
        if isinstance(N, bool) or not isinstance(N, int) or N < 2 or N % 2:
            raise ValueError(f"d_state must be an even integer >= 2 (conjugate pairs, N/2 stored "
                             f"modes), got {N!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not valid. Valid choices: {', '.join(MODES)}")
        if self.mode == "dplr" and self.ssm_init != "legs":
            raise ValueError(f"mode='dplr' supports ssm_init='legs' only, got {self.ssm_init!r} "
                             f"(use mode='diag' for {', '.join(ssm.INITS)})")
        if self.ssm_init not in ssm.INITS:
            raise ValueError(f"ssm_init={self.ssm_init!r} is not valid. Valid choices: "
                             f"{', '.join(ssm.INITS)}")
        if self.disc not in ssm.DISCRETIZATIONS:
            raise ValueError(f"disc={self.disc!r} is not valid. Valid choices: "
                             f"{', '.join(ssm.DISCRETIZATIONS)}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} is not valid. Valid choices: "
                             f"{', '.join(ACTIVATIONS)}")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if self.decode and self.bidirectional:
            raise ValueError("decode=True (autoregressive) is not possible with bidirectional")
        if self.decode and (self.l_max is None or self.l_max <= 0):
            raise ValueError("decode=True needs l_max (> 0): the length C-tilde was trained for")

    def _ssm_params(self, H: int, L: int) -> dict[str, jax.Array]:
        """The SSM parameters; ``L`` is the length C-tilde is formed for at init."""
        N, n = self.d_state, self.d_state // 2
        if self.mode == "dplr":
            Lambda, P, B, _ = ssm.legs_dplr(N)
            Lambda, P, B = Lambda[:n], P[:n], B[:n]
        else:
            Lambda, B = ssm.s4d_init(N, self.ssm_init)
            P = None
        tile = lambda x: np.tile(x[None], (H,) + (1,) * x.ndim)  # noqa: E731
        const = lambda x: (lambda key, shape: jnp.asarray(x))  # noqa: E731
        out = {
            "log_Lambda_real": self.param("log_Lambda_real",
                                          const(tile(np.log(-Lambda.real)).astype(np.float32)),
                                          (H, n)),
            "Lambda_imag": self.param("Lambda_imag", const(tile(Lambda.imag).astype(np.float32)),
                                      (H, n)),
            "B": self.param("B", const(tile(_pair(B))), (H, n, 2)),
        }
        if P is not None:
            out["P"] = self.param("P", const(tile(_pair(P))), (H, n, 2))
        lo, hi = np.log(self.dt_min), np.log(self.dt_max)
        out["log_step"] = self.param(
            "log_step", lambda key, shape: jax.random.uniform(key, shape, minval=lo, maxval=hi),
            (H,))

        def c_init(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
            # C ~ CN(0, 1) (official: torch.randn(..., dtype=torch.cfloat)); for DPLR the stored
            # parameter is C-tilde = C (I - Abar^L), formed once from the initial Lambda, P, B and
            # step, as the official SSMKernelDPLR._setup_C does at its first forward.
            c = jax.random.normal(key, shape) * 0.5 ** 0.5
            if self.mode != "dplr":
                return c
            Lambda = jax.lax.complex(-jnp.exp(out["log_Lambda_real"]), out["Lambda_imag"])
            full = [ssm.expand_conj(x) for x in (Lambda, _complex(out["P"]), _complex(out["B"]),
                                                 _complex(c))]
            ct = ssm.ctilde(full[0], full[1], full[1], full[2], full[3],
                            jnp.exp(out["log_step"]), L)[..., :n]
            return jnp.stack([jnp.real(ct), jnp.imag(ct)], -1).astype(jnp.float32)

        out["C"] = self.param("C", c_init, (H, n, 2))
        if self.bidirectional:
            out["C_reverse"] = self.param("C_reverse", c_init, (H, n, 2))
        return out

    def _kernel(self, p: dict[str, jax.Array], C: jax.Array, L: int) -> jax.Array:
        Lambda = jax.lax.complex(-jnp.exp(p["log_Lambda_real"]), p["Lambda_imag"])
        step = jnp.exp(p["log_step"])
        if self.mode == "dplr":
            P = _complex(p["P"])
            return ssm.dplr_kernel(Lambda, P, P, _complex(p["B"]), C, step, L, conj_sym=True,
                                   chunk_size=self.chunk_size)
        return ssm.s4d_kernel(Lambda, _complex(p["B"]), C, step, L, method=self.disc,
                              conj_sym=True)

    def _step_params(self, p: dict[str, jax.Array]):
        Lambda = jax.lax.complex(-jnp.exp(p["log_Lambda_real"]), p["Lambda_imag"])
        step = jnp.exp(p["log_step"])
        if self.mode == "dplr":
            P, B, Ct = _complex(p["P"]), _complex(p["B"]), _complex(p["C"])
            C_bar = self.variable("cache", "C_bar", lambda: ssm.recover_c(
                Lambda, P, P, B, Ct, step, self.l_max, conj_sym=True))
            return ssm.dplr_step_params(Lambda, P, P, B, Ct, step, self.l_max, conj_sym=True,
                                        C=C_bar.value)
        return ssm.diag_step_params(Lambda, _complex(p["B"]), _complex(p["C"]), step, self.disc)

    @nn.compact
    def __call__(self, u: jax.Array) -> jax.Array:
        """``u (batch, L, H)`` -> ``(batch, L, H)`` (``L = 1`` in decode mode)."""
        self._check()
        batch, L, H = u.shape
        p = self._ssm_params(H, self.l_max or L)
        D = self.param("D", nn.initializers.normal(1.0), (H,))   # official: torch.randn
        if self.decode:
            if L != 1:
                raise ValueError(f"decode=True takes one step at a time: got L={L}")
            step_params = self._step_params(p)
            state = self.variable("cache", "state", lambda: jnp.zeros(
                (batch, H, self.d_state // 2), jnp.complex64))
            x, y = ssm.step(step_params, state.value, u[:, 0, :], conj_sym=True)
            if not self.is_initializing():
                state.value = x
            y = y[:, None, :]
        else:
            ut = jnp.swapaxes(u, 1, 2)                                # (batch, H, L)
            K = self._kernel(p, _complex(p["C"]), L)
            if self.bidirectional:
                K_reverse = self._kernel(p, _complex(p["C_reverse"]), L)
                y = bidirectional_conv(ut, K, K_reverse)
            else:
                y = causal_conv(ut, K)
            y = jnp.swapaxes(y, 1, 2)
        y = nn.gelu(y + D * u)
        if self.activation == "glu":
            return nn.glu(nn.Dense(2 * H, name="out")(y), axis=-1)
        return nn.Dense(H, name="out")(y)


class S4Model(nn.Module):
    """Encoder -> ``n_layers`` x (S4Layer + residual + LayerNorm) -> pool -> decoder.

    ``x (batch, L, d_input) -> (batch, d_output)`` (``pool='mean'|'last'``) or
    ``(batch, L, d_output)`` (``pool='none'``, e.g. autoregressive models). Layer attributes are
    forwarded to every :class:`S4Layer`.
    """

    d_output: int
    d_model: int = 64
    n_layers: int = 2
    prenorm: bool = False
    pool: str = "mean"
    d_state: int = 64
    mode: str = "dplr"
    ssm_init: str = "legs"
    disc: str = "zoh"
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    bidirectional: bool = False
    activation: str = "glu"
    chunk_size: int | None = None
    l_max: int | None = None
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r} is not valid. Valid choices: {', '.join(POOLS)}")
        x = nn.Dense(self.d_model, name="encoder")(x)
        for i in range(self.n_layers):
            z = nn.LayerNorm(name=f"norm_{i}")(x) if self.prenorm else x
            z = S4Layer(d_state=self.d_state, mode=self.mode, ssm_init=self.ssm_init,
                        disc=self.disc, dt_min=self.dt_min, dt_max=self.dt_max,
                        bidirectional=self.bidirectional, activation=self.activation,
                        chunk_size=self.chunk_size, l_max=self.l_max, decode=self.decode,
                        name=f"s4_{i}")(z)
            x = x + z
            if not self.prenorm:
                x = nn.LayerNorm(name=f"norm_{i}")(x)
        if self.pool == "mean":
            x = jnp.mean(x, axis=1)
        elif self.pool == "last":
            x = x[:, -1]
        return nn.Dense(self.d_output, name="decoder")(x)


def ssm_labels(params: Any) -> Any:
    """Label tree: ``'ssm'`` for Lambda, P, B, log_step leaves, ``'default'`` for the rest."""
    flat = traverse_util.flatten_dict(params)
    labels = {k: ("ssm" if k[-1] in SSM_PARAMS else "default") for k in flat}
    return traverse_util.unflatten_dict(labels)


def s4_optimizer(learning_rate: float | Callable[[int], float], weight_decay: float = 0.01,
                 ssm_learning_rate: float = 1e-3) -> optax.GradientTransformation:
    """AdamW for the ``'default'`` parameters, Adam (lr ``ssm_learning_rate``, no weight decay)
    for the SSM parameters (Lambda, P, B, log_step), via ``optax.multi_transform``."""
    return optax.multi_transform(
        {"ssm": optax.adam(ssm_learning_rate),
         "default": optax.adamw(learning_rate, weight_decay=weight_decay)},
        ssm_labels)
