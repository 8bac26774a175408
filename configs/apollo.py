"""APOLLO pretraining (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv
2412.05270): Adam moments on a seeded random projection estimate channel-wise gradient scaling
factors for the raw gradient, with Fira's norm-growth limiter.

Settings from the official pre-training scripts (github.com/zhuhanqing/APOLLO, commit 76b3472,
``scripts/pretrain_c4/llama_*_apollo{,_mini}.sh`` and ``main_pretrain.py``): lr 0.01,
update_proj_gap 200, weight decay 0, ``--proj random``, ``proj_type`` std (argparse default, no
script overrides it); APOLLO channel-wise with scale 1 and rank 128 / 192 / 256 / 256 for LLaMA
60M / 130M / 350M / 1B (256 for 7B); APOLLO-Mini rank 1, tensor-wise, scale 128 at every size
(only the 60M Mini script adds ``--scale_front``; lrx keeps it off). Defaults here: the tiny
LLaMA with rank 32 (a quarter of its hidden size, the 130M script's rule).

    python run.py --config=configs/apollo.py
    python run.py --config=configs/apollo.py:mini          # APOLLO-Mini
    python run.py --config=configs/apollo.py:llama_60m     # rank 128 (official 60M script)
    python run.py --config=configs/apollo.py:mini,llama_60m  # APOLLO-Mini keeps rank 1
"""

from experiments import lm

# The official scripts' APOLLO rank per model size (APOLLO-Mini: 1 everywhere).
OFFICIAL_RANKS = {"llama_60m": 128, "llama_130m": 192, "llama_350m": 256, "llama_1b": 256}


def _mini(config):
    config.optimizer.rank = 1
    config.optimizer.scale_type = "tensor"
    config.optimizer.scale = 128.0


def _paper(name):
    def apply(config):
        lm.VARIANTS[name](config)          # the size's model, steps, lr 0.01 (and GaLore's rank)
        mini = config.optimizer.scale_type == "tensor"
        config.optimizer.rank = 1 if mini else OFFICIAL_RANKS[name]
    return apply


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("apollo")
    config.optimizer.learning_rate = 0.01
    config.optimizer.rank = 32
    variants = {**lm.VARIANTS, "mini": _mini,
                **{name: _paper(name) for name in OFFICIAL_RANKS if name in lm.VARIANTS}}
    return lm.apply_arg(config, arg, variants)
