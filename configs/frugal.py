"""FRUGAL pretraining (Zmushko et al., arXiv 2411.07837): Adam in a density-0.25 subspace of each
attention/MLP matrix, signSGD on the rest, state reset at every refresh (the official scripts'
settings: update_proj_gap 200, density 0.25; the official pretraining lr is 1e-3, the tiny CPU model
uses 3e-3 like the AdamW baseline).

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
