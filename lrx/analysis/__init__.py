"""lrx.analysis: spectral diagnostics (singular values, effective / stable rank, energy, subspace
overlap, WeLore rank reduction, intruder dimensions)."""

from lrx.analysis.spectra import (
    METRICS,
    effective_rank,
    intruder_dimensions,
    layer_metrics,
    matrix_metrics,
    max_cosine_similarity,
    principal_angles,
    randomized_svd,
    rank_at_energy,
    singular_values,
    spectrum_metrics,
    stable_rank,
    subspace_overlap,
    top_r_energy,
    welore_classify,
    welore_rank_reduction,
    welore_threshold,
)

__all__ = [
    "METRICS",
    "effective_rank",
    "intruder_dimensions",
    "layer_metrics",
    "matrix_metrics",
    "max_cosine_similarity",
    "principal_angles",
    "randomized_svd",
    "rank_at_energy",
    "singular_values",
    "spectrum_metrics",
    "stable_rank",
    "subspace_overlap",
    "top_r_energy",
    "welore_classify",
    "welore_rank_reduction",
    "welore_threshold",
]
