"""lrx.ssm: structured state space kernels (S4 with the HiPPO low-rank correction, S4D).

S4: A. Gu, K. Goel, C. Re, "Efficiently Modeling Long Sequences with Structured State Spaces",
arXiv 2111.00396. S4D: A. Gu, A. Gupta, K. Goel, C. Re, "On the Parameterization and
Initialization of Diagonal State Space Models", arXiv 2206.11893.

* :mod:`lrx.ssm.hippo` -- HiPPO-LegS (eq. 2), its DPLR form (Cor. 3.1), S4D inits (float64 NumPy).
* :mod:`lrx.ssm.kernels` -- bilinear discretisation (eq. 3), C-tilde (Lemma C.2), the DPLR kernel
  by the generating function + Woodbury + one shared Cauchy matrix (Alg. 1), naive powering, S4D
  Vandermonde kernels.
* :mod:`lrx.ssm.recurrent` -- the O(n) DPLR step (App. C.2) and the diagonal step.
* :mod:`lrx.ssm.reference` -- float64 NumPy powering references (for reports and benchmarks).
"""

from lrx.ssm.hippo import INITS, hippo_legs, legs_dplr, legs_low_rank, s4d_init
from lrx.ssm.kernels import (
    DISCRETIZATIONS,
    c_from_ctilde,
    ctilde,
    discretize_bilinear,
    discretize_diag,
    dplr_kernel,
    dplr_kernel_separate,
    dplr_matrix,
    expand_conj,
    krylov_kernel,
    s4d_kernel,
)
from lrx.ssm.recurrent import (
    DiagStep,
    DPLRStep,
    diag_step_params,
    dplr_step_params,
    init_state,
    recover_c,
    scan,
    step,
)
from lrx.ssm.reference import (
    abar_power_norm_f64,
    ctilde_f64,
    dense_bilinear_f64,
    power_kernel_f64,
    relative_max_error,
)

__all__ = [
    "DISCRETIZATIONS", "INITS", "DPLRStep", "DiagStep", "c_from_ctilde", "ctilde",
    "diag_step_params", "discretize_bilinear", "discretize_diag", "dplr_kernel",
    "dplr_kernel_separate", "dplr_matrix", "dplr_step_params", "expand_conj", "hippo_legs",
    "init_state", "krylov_kernel", "legs_dplr", "legs_low_rank", "recover_c", "s4d_init",
    "s4d_kernel", "scan", "step", "ctilde_f64", "dense_bilinear_f64", "power_kernel_f64",
    "abar_power_norm_f64", "relative_max_error",
]
