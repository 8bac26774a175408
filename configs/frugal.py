"""FRUGAL pretraining (Zmushko et al., arXiv 2411.07837): Adam on a density-0.25 state-full part of
the attention/MLP matrices, signSGD on the rest, state reset at every refresh.

The paper variants (``llama_*``) follow the official pre-training scripts: ``--optimizer frugal``
is the block-wise optimizer (whole matrices state-full, ``subspace='blocks'``,
``block_order='descending'``), density 0.25, update_gap 200, lr 1e-3, eps 1e-8, no gradient
clipping. The tiny CPU default keeps an SVD subspace (a per-matrix state-full part, whose
optimizer state is really smaller; lrx's ``blocks`` keeps full-size zero state for inactive
matrices) at lr 3e-3 like the AdamW baseline.

    python run.py --config=configs/frugal.py
    python run.py --config=configs/frugal.py:llama_60m
    python run.py --config=configs/frugal.py:density=0.5,subspace=random
"""

from experiments import common, lm


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("frugal")
    config.optimizer.learning_rate = 3e-3
    config.optimizer.eps = 1e-8  # the FRUGAL code's Adam eps (GaLore's class default is 1e-6)
    return common.apply_arg(config, arg, lm.VARIANTS, inactive=lm.inactive_sections)
