"""Compiled memory of a full bf16 train step of llama_1b and llama_7b (vocab 32000, batch 1x256)
for AdamW, 8-bit AdamW, optax.contrib.galore, lrx GaLore ordinary / per-layer / per-layer + 8-bit,
FRUGAL, Fira, APOLLO(-Mini), from shapes only (experiments/bench_memory.py).

    python run.py --config=configs/bench_memory.py                # both models, every row
    python run.py --config=configs/bench_memory.py:llama_1b       # one model
    python run.py --config=configs/bench_memory.py:smoke          # tiny shapes, seconds
    python run.py --config=configs/bench_memory.py:fsdp           # the FSDP rows only (8 fake
                                                                  # CPU devices, a child process)
    python run.py --config=configs/bench_memory.py:smoke,fsdp     # tiny FSDP rows
"""

from experiments import bench_memory

TOKENS = ("smoke", "fsdp", "llama_1b", "llama_7b")


def get_config(arg=None):
    c = bench_memory.defaults()
    tokens = [t for t in (arg or "").split(",") if t]
    for t in tokens:
        if t not in TOKENS:
            raise ValueError(f"unknown variant token {t!r} for configs/bench_memory.py; valid "
                             f"tokens: {', '.join(TOKENS)}")
    models = tuple(t for t in tokens if t.startswith("llama_"))
    if models:
        c.models = models
    if "smoke" in tokens:
        c.models = ("tiny",)
        c.vocab_size = 256
        c.seq_len = 16
        c.num_layers = 2
        c.block_size = 256
        c.optimizers = ("adamw", "galore_per_layer_8bit")
        c.fsdp_models = ("tiny",)
        c.fsdp_optimizers = ()     # the FSDP rows need a child process with 8 devices
    if "fsdp" in tokens:
        c.optimizers = ()
        c.fsdp_optimizers = bench_memory.defaults().fsdp_optimizers
    return c
