"""S4 kernel study: correctness vs float64 and timing/memory of naive powering, four separate Cauchy
sums, the shared Cauchy matrix (plain and chunked) and S4D (experiments/bench_s4.py).

    python run.py --config=configs/bench_s4.py            # N=64, H in {1, 64}, L in {1k, 4k, 16k}
    python run.py --config=configs/bench_s4.py:smoke      # seconds
    python run.py --config=configs/bench_s4.py:quick      # L in {1k, 4k}, 1 repeat
"""

from experiments import bench_s4

VARIANTS = ("smoke", "quick")


def get_config(arg=None):
    c = bench_s4.defaults()
    for token in [t for t in (arg or "").split(",") if t]:
        if token not in VARIANTS:
            raise ValueError(f"unknown variant {token!r} for configs/bench_s4.py; valid: "
                             f"{', '.join(VARIANTS)}")
        if token == "smoke":
            c.N = 16
            c.hs = (2,)
            c.lengths = (128,)
            c.variants = ("naive", "shared", "shared_chunked")
            c.chunk_size = 16
            c.repeats = 1
            c.correctness.update(steps=(0.01,), lengths=(128,), recurrence_length=128)
        elif token == "quick":
            c.lengths = (1024, 4096)
            c.repeats = 1
            c.correctness.update(lengths=(1024, 4096))
    return c
