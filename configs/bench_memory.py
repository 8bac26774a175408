"""Compiled memory of a full bf16 train step of llama_1b and llama_7b (vocab 32000, batch 1x256)
for AdamW, 8-bit AdamW, optax.contrib.galore, lrx GaLore ordinary / per-layer / per-layer + 8-bit,
FRUGAL, Fira, APOLLO(-Mini), from shapes only, and the FSDP rows (per-device peak and collective
bytes on 8 fake CPU devices) (experiments/bench_memory.py).

    python run.py --config=configs/bench_memory.py                # both models, every row
    python run.py --config=configs/bench_memory.py:llama_1b       # one model
    python run.py --config=configs/bench_memory.py:smoke          # tiny shapes, seconds
    python run.py --config=configs/bench_memory.py:fsdp           # the FSDP rows only (8 fake
                                                                  # CPU devices, a child process)
    python run.py --config=configs/bench_memory.py:smoke,fsdp     # tiny FSDP rows
    python run.py --config=configs/bench_memory.py:llama_1b,optimizers=adamw+galore_bf16

Tokens combine with commas in the one config grammar (``experiments.common.apply_arg``): a
variant name or ``KEY=VALUE`` for any key of ``experiments.bench_memory.defaults()``.
"""

from experiments import bench_memory, common


def _only(model):
    def apply(c):
        c.models = (model,)
    return apply


def _smoke(c):
    c.models = ("tiny",)
    c.vocab_size = 256
    c.seq_len = 16
    c.num_layers = 2
    c.block_size = 256
    c.optimizers = ("adamw", "galore_per_layer_8bit")
    c.fsdp_models = ("tiny",)
    c.fsdp_optimizers = ()     # the FSDP rows need a child process with 8 devices


def _fsdp(c):
    c.optimizers = ()
    c.fsdp_optimizers = bench_memory.defaults().fsdp_optimizers


VARIANTS = {"smoke": _smoke, "fsdp": _fsdp, "llama_1b": _only("llama_1b"),
            "llama_7b": _only("llama_7b")}


def get_config(arg=None):
    return common.apply_arg(bench_memory.defaults(), arg, VARIANTS)
