"""S4 kernel study: correctness vs float64 and timing/memory of naive powering, four separate Cauchy
sums, the shared Cauchy matrix (plain and chunked) and S4D (experiments/bench_s4.py).

    python run.py --config=configs/bench_s4.py            # N=64, H in {1, 64}, L in {1k, 4k, 16k}
    python run.py --config=configs/bench_s4.py:smoke      # seconds
    python run.py --config=configs/bench_s4.py:quick      # L in {1k, 4k}, 1 repeat
    python run.py --config=configs/bench_s4.py:quick,N=32
"""

from experiments import bench_s4, common


def _smoke(c):
    c.N = 16
    c.hs = (2,)
    c.lengths = (128,)
    c.variants = ("naive", "shared", "shared_chunked")
    c.chunk_size = 16
    c.repeats = 1
    c.correctness.update(steps=(0.01,), lengths=(128,), recurrence_length=128)


def _quick(c):
    c.lengths = (1024, 4096)
    c.repeats = 1
    c.correctness.update(lengths=(1024, 4096))


VARIANTS = {"smoke": _smoke, "quick": _quick}


def get_config(arg=None):
    return common.apply_arg(bench_s4.defaults(), arg, VARIANTS)
