"""Benchmark of lrx.optim against optax.adamw and optax.contrib.galore on LLaMA-shaped parameter
sets (update time without/with refresh, optimizer-state bytes, compiled memory) plus a full
train-step row (forward + backward + update of real models).

    python run.py --config=configs/bench_optim.py                    # LLaMA-60M, minutes
    python run.py --config=configs/bench_optim.py:llama_130m         # + the 130M set
    python run.py --config=configs/bench_optim.py:llama_350m         # + the 350M set
    python run.py --config=configs/bench_optim.py:no_train_step      # optimizer rows only
    python run.py --config=configs/bench_optim.py:no_memory          # skip the llama_1b memory rows
    python run.py --config=configs/bench_optim.py:smoke              # tiny shapes, seconds

Variant tokens combine with commas (``llama_130m,no_train_step``). The harness limits the host
BLAS to one thread (threadpoolctl): XLA:CPU's SVD/QR/eigh run in scipy's OpenBLAS, whose
busy-waiting threads made decompositions 30-500x slower on a shared machine.
"""

import ml_collections

OPTIMIZERS = ("adamw", "optax_galore", "galore_svd_std", "galore_svd_reverse_std",
              "galore_randomized_std", "galore_randomized_reverse_std", "frugal", "fira",
              "apollo", "apollo_mini")
TOKENS = ("smoke", "llama_130m", "llama_350m", "no_train_step", "no_memory")


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.experiment = "bench_optim"
    c.seed = 0
    # Parameter sets: the shapes of lrx.models.llama presets (GaLore's llama_*.json); the
    # projected leaves are the attention and MLP kernels (GaLore's recipe).
    c.models = ("llama_60m",)
    # GaLore paper ranks per size (Table 2 / scripts).
    c.ranks = ml_collections.ConfigDict(dict(tiny=32, llama_60m=128, llama_130m=256,
                                             llama_350m=256, llama_1b=512))
    c.vocab_size = 32000
    c.num_layers = 0               # 0: the preset's depth; >0 truncates (smoke)
    c.update_proj_gap = 200
    c.optimizers = OPTIMIZERS
    c.repeats = 5                  # timed calls per measurement (fastest reported)
    c.refresh_repeats = 2           # the first call after compiling pays one-off costs
    c.oversample = 8               # randomized projector
    c.power_iters = 1
    c.density = 0.25               # frugal
    c.train_step = ml_collections.ConfigDict(dict(
        enabled=True, models=("tiny", "llama_60m"), batch_size=2, seq_len=64, repeats=3,
        optimizers=("adamw", "optax_galore", "galore_randomized_reverse_std", "frugal",
                    "fira", "apollo", "apollo_mini")))
    # Compiled peak memory of a full f32 train step (unrolled layers, remat) from shapes only.
    c.memory = ml_collections.ConfigDict(dict(
        enabled=True, models=("llama_1b",), batch_size=1, seq_len=256, remat=True,
        optimizers=("adamw", "optax_galore", "galore_svd_reverse_std", "fira_reverse_std",
                    "fira", "frugal", "apollo", "apollo_mini")))
    tokens = [t for t in (arg or "").split(",") if t]
    for t in tokens:
        if t not in TOKENS:
            raise ValueError(f"unknown variant token {t!r}; valid tokens: {', '.join(TOKENS)}")
    if "llama_130m" in tokens:
        c.models = (*c.models, "llama_130m")
    if "llama_350m" in tokens:
        c.models = (*c.models, "llama_350m")
    if "no_train_step" in tokens:
        c.train_step.enabled = False
    if "no_memory" in tokens:
        c.memory.enabled = False
    if "smoke" in tokens:
        c.models = ("tiny",)
        c.num_layers = 1
        c.vocab_size = 256
        c.repeats = 1
        c.optimizers = ("adamw", "galore_randomized_reverse_std")
        c.train_step.models = ("tiny",)
        c.train_step.seq_len = 16
        c.train_step.repeats = 1
        c.train_step.optimizers = ("galore_svd_reverse_std",)
        c.memory.models = ("tiny",)
        c.memory.seq_len = 16
        c.memory.optimizers = ("optax_galore", "galore_svd_reverse_std", "apollo_mini")
    return c
