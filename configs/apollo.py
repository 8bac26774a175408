"""APOLLO pretraining (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", arXiv
2412.05270): Adam moments on a seeded random projection estimate channel-wise gradient scaling
factors for the raw gradient, with Fira's norm-growth limiter. The official pre-training scripts:
lr 0.01, update_proj_gap 200, proj_type std, APOLLO channel-wise with scale 1, APOLLO-Mini rank 1,
tensor-wise, scale 128. Defaults: the tiny LLaMA with rank 32 (a quarter of its hidden size).

    python run.py --config=configs/apollo.py
    python run.py --config=configs/apollo.py:mini          # APOLLO-Mini
    python run.py --config=configs/apollo.py:llama_60m     # rank 128 (official 60M script)
    python run.py --config=configs/apollo.py:mini,llama_60m  # APOLLO-Mini keeps rank 1
"""

from experiments import common, lm


def _mini(config):
    config.optimizer.rank = 1
    config.optimizer.scale_type = "tensor"
    config.optimizer.scale = 128.0


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("apollo")
    config.optimizer.learning_rate = 0.01
    config.optimizer.rank = 32
    return common.apply_arg(config, arg, {**lm.VARIANTS, "mini": _mini},
                            inactive=lm.inactive_sections)
