"""Multi-process training: 2 processes on localhost (``jax.distributed.initialize`` with a local
coordinator, CPU collectives over gloo) x 4 fake CPU devices each run three sharded GaLore train
steps of a small LLaMA on a ``data=2, fsdp=4`` mesh; the losses equal one process with 8 fake
devices to 1e-6 (relative) and the final parameters to 1e-5 (absolute; weights ~0.1, one step
moves them ~1e-2): gloo's all-reduce sums in another order than the in-process one, and Adam's
``m / (sqrt(v) + eps)`` turns float32 rounding of near-zero gradient entries into up to
``lr / eps`` times larger update differences (measured: losses 1.1e-7 relative, parameters
<= 1.8e-6). Every process runs under a timeout, so a hang fails.

The file is also the worker: ``python tests/train/test_multiprocess.py OUT PROCESS_ID
NUM_PROCESSES PORT`` (NUM_PROCESSES=0: single process, no distributed runtime).
"""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT_S = 240


def worker(out: str, process_id: int, num_processes: int, port: int) -> None:
    import jax

    if num_processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                                   num_processes=num_processes, process_id=process_id,
                                   initialization_timeout=120)
    import jax.numpy as jnp
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    import lrx.optim as lo
    from lrx.models.llama import Llama, preset
    from lrx.train import loop, sharding

    assert jax.device_count() == 8, jax.device_count()
    mesh = sharding.make_mesh(data=2, fsdp=4)
    cfg = preset("tiny", hidden_size=64, intermediate_size=128, num_heads=2, num_layers=2,
                 vocab_size=64, max_len=32)
    model = Llama(cfg)
    opt = lo.galore(1e-2, rank=8, update_proj_gap=2, mask=lambda p: lo.path_mask(p, lo.ATTN_MLP))

    def loss_fn(p, fz, batch, rng):  # noqa: ARG001
        logits = model.apply({"params": p}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean(), {}

    def init(key):
        params = model.init(key, jnp.zeros((1, 16), jnp.int32))["params"]
        return loop.create_state(params, opt, seed=0)

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.tree_shardings(abstract, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = shardings.replace(step=replicated, rng=replicated)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    step = jax.jit(loop.make_step(loss_fn, opt), in_shardings=(shardings, None),
                   out_shardings=(shardings, replicated), donate_argnums=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (3, 1, 8, 17), np.int32)
    losses = []
    for t in range(3):   # refreshes at counts 0 and 2
        batch = sharding.put_batch(tokens[t], sharding.batch_sharding(mesh, 3, batch_axis=1))
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    params = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        flat = {"/".join(str(k.key) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        np.savez(out, losses=np.asarray(losses), **flat)
    if num_processes:
        jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    from tests.conftest import xla_flags

    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
               XLA_FLAGS=xla_flags(devices))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _wait(procs) -> None:
    try:
        for p in procs:
            out, _ = p.communicate(timeout=TIMEOUT_S)
            assert p.returncode == 0, out.decode()[-3000:]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a worker did not finish within {TIMEOUT_S} s (hang in the collectives?)")


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    one, two = str(tmp_path / "one.npz"), str(tmp_path / "two.npz")
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, __file__, two, str(i), "2", str(port)],
                              cwd=ROOT, env=_env(4), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for i in range(2)]
    _wait(procs)
    _wait([subprocess.Popen([sys.executable, __file__, one, "0", "0", "0"], cwd=ROOT,
                            env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)])
    a, b = np.load(one), np.load(two)
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 5
    assert np.all(np.isfinite(a["losses"])) and a["losses"].shape == (3,)
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-6)
    for k in a.files:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-5, err_msg=k)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
