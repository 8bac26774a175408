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

from experiments import bench_optim, common


def _add(model):
    def apply(c):
        c.models = (*c.models, model)
    return apply


def _no_train_step(c):
    c.train_step.enabled = False


def _no_memory(c):
    c.memory.enabled = False


def _smoke(c):
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


VARIANTS = {"smoke": _smoke, "llama_130m": _add("llama_130m"), "llama_350m": _add("llama_350m"),
            "no_train_step": _no_train_step, "no_memory": _no_memory}


def get_config(arg=None):
    return common.apply_arg(bench_optim.defaults(), arg, VARIANTS)
