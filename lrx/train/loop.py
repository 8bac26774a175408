"""The shared training loop.

``train(...)`` runs a jit-compiled, buffer-donating step with gradient accumulation over
micro-batches, on a device mesh with explicit shardings; evaluates periodically; writes
``metrics.jsonl`` (and TensorBoard events when ``tensorboardX`` is installed); saves orbax
checkpoints every N steps and at the end (keeping the last k) and resumes from the newest one in the
workdir that restores (a damaged newer one is moved aside to ``checkpoints.broken/``); stops at the
first non-finite loss without checkpointing the bad state; turns SIGTERM/SIGINT into "save a
checkpoint at the next step boundary and return", and exits at once (naming the step) when no
boundary comes within a grace period or a second signal arrives; limits host BLAS threads.

Exact resume: the batch at step t comes from ``batch_fn(t)`` (a pure function of the step) and the
step's randomness from the state's key, so N steps + resume + N steps gives the same parameters as
2N steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lrx.optim.subspace import tree_bytes
from lrx.param import count_params
from lrx.train import sharding as shd
from lrx.train.step import LossFn, TrainState, create_state, make_step  # noqa: F401 (API)
from lrx.train.sweep import make_sweep_step, num_replicas, replica_axes

PyTree = Any
Hook = Callable[[int, "TrainState", PyTree], tuple["TrainState", dict | None]]
log = logging.getLogger("lrx.train")


class MetricWriter:
    """Appends one JSON object per call to ``workdir/metrics.jsonl`` and mirrors scalars to
    TensorBoard (``workdir/tb``) when ``tensorboardX`` is importable."""

    def __init__(self, workdir: str, *, tensorboard: bool = True):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if tensorboard and jax.process_index() == 0:
            try:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                self._tb = None

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after ``step`` (they are recomputed when a run resumes)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, metrics: dict) -> None:
        if jax.process_index() != 0:
            return
        record = {"step": int(step), **{k: _py(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _py(v: Any) -> Any:
    if isinstance(v, (jax.Array, np.ndarray, np.generic)):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v


def memory_report(compiled: Any) -> dict:
    """XLA's memory analysis of a compiled computation (bytes): arguments, outputs, temporaries,
    aliased (donated) bytes, and the peak estimate
    ``arguments + outputs + temporaries - aliased``."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        m = None
    if m is None:
        return {}
    out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
           for k in ("argument", "output", "temp", "alias", "generated_code")}
    out["peak_estimate"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def device_peak_bytes() -> int | None:
    """Peak bytes in use on device 0 when the backend reports it (GPU/TPU), else None."""
    try:
        stats = jax.local_devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def host_peak_rss_bytes() -> int:
    """Peak resident memory of this process (bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class NonFiniteLoss(RuntimeError):
    """Raised at the first step whose loss (or, at a checkpoint, whose resulting state) is NaN or
    infinite; ``step`` is that step's index (0-based: the number of steps done before it)."""

    def __init__(self, step: int, loss: float, *, what: str = "loss", replica: str = ""):
        value = f" {loss}" if what == "loss" else ""
        where = f" of {replica}" if replica else ""
        super().__init__(f"non-finite {what}{value} at step {step}{where}; stopped without "
                         "checkpointing this state (the last good checkpoint is kept)")
        self.step = step
        self.replica = replica


def limit_blas_threads(threads: int = 1) -> list[dict]:
    """Limits the host BLAS/LAPACK thread pools (OpenBLAS, MKL, BLIS) of this process to
    ``threads`` with threadpoolctl; returns threadpoolctl's description of the pools it limited.

    XLA:CPU runs SVD/QR/eigh through scipy's LAPACK. With one OpenBLAS thread pool per core, its
    busy-waiting workers fight XLA's own threads (and each other, on many fake devices): a first
    FRUGAL/Fira step under FSDP took 137-191 s instead of 24 s on 2 cores. XLA parallelises over
    matrices and devices itself, so one BLAS thread per call is the right setting; no environment
    variable is needed. Idempotent.
    """
    try:
        import scipy.linalg  # noqa: F401 - loads the LAPACK that jaxlib calls, so it can be limited
    except ImportError:  # pragma: no cover - scipy comes with jax
        pass
    try:
        from threadpoolctl import threadpool_info, threadpool_limits
    except ImportError:  # pragma: no cover - a dependency in setup.cfg
        log.warning("threadpoolctl is not installed: BLAS threads are not limited "
                    "(pip install threadpoolctl, or set OPENBLAS_NUM_THREADS=1)")
        return []
    threadpool_limits(limits=threads, user_api="blas")
    return [p for p in threadpool_info() if p.get("user_api") == "blas"]


class _StopSignals:
    """SIGTERM/SIGINT handling that works even while the main thread is stuck in native code.

    The first signal sets ``self.signal`` (the loop checkpoints at the next step boundary and calls
    :meth:`acknowledge`). A watchdog thread learns of every signal at once through
    ``signal.set_wakeup_fd`` (written by the C-level handler, so it needs no Python bytecode in
    the main thread): if the loop does not reach a step boundary within ``grace_seconds`` of the
    first signal, or a second signal arrives, it prints one line naming the step and the last good
    checkpoint and exits the process at once (``os._exit(128 + signum)``).
    """

    def __init__(self, grace_seconds: float):
        self.grace_seconds = float(grace_seconds)
        self.signal: str | None = None
        self.step = 0                       # steps completed (updated by the loop)
        self.last_checkpoint: int | None = None
        self.checkpoint_dir = ""
        self._acknowledged = threading.Event()
        self._closed = threading.Event()
        self._handlers: dict = {}
        self._old_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # signals are delivered to the main thread only: nothing to handle
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._handlers[sig] = signal.signal(sig, self._handler)
        self._thread = threading.Thread(target=self._watch, name="lrx-stop-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        for sig, old in self._handlers.items():
            signal.signal(sig, old)
        signal.set_wakeup_fd(self._old_wakeup)
        self._closed.set()
        os.write(self._pipe[1], b"\0")  # wakes the watchdog
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            os.close(self._pipe[0])
            os.close(self._pipe[1])
        self._pipe = None

    def _handler(self, signum, frame) -> None:  # noqa: ARG002 - main thread, between bytecodes
        if self.signal is None:
            self.signal = signal.Signals(signum).name

    def acknowledge(self) -> None:
        """The loop reached a step boundary after the signal and is checkpointing."""
        self._acknowledged.set()

    def _watch(self) -> None:
        r = self._pipe[0]
        received: list[int] = []
        deadline = None
        while not self._closed.is_set():
            timeout = None
            if deadline is not None and not self._acknowledged.is_set():
                timeout = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([r], [], [], timeout)
            if self._closed.is_set():
                return
            if not ready:  # the grace period ran out without a step boundary
                self._exit(received[0], f"no step boundary within {self.grace_seconds:g} s")
            for byte in os.read(r, 64):
                if byte not in (signal.SIGTERM, signal.SIGINT):
                    continue
                received.append(byte)
                if len(received) == 1:
                    self.signal = self.signal or signal.Signals(byte).name
                    deadline = time.monotonic() + self.grace_seconds
                else:
                    self._exit(byte, f"second signal ({signal.Signals(byte).name})")

    def _exit(self, signum: int, why: str) -> None:
        last = ("none" if self.last_checkpoint is None else
                f"step {self.last_checkpoint} in {self.checkpoint_dir}")
        message = (f"lrx: {signal.Signals(signum).name if signum else 'signal'} received during "
                   f"step {self.step + 1} ({self.step} steps done); {why}: exiting now without a "
                   f"checkpoint. Last good checkpoint: {last}.\n")
        try:
            os.write(2, message.encode())
        finally:
            os._exit(128 + int(signum))


def _stop_signals(grace_seconds: float = 60.0) -> _StopSignals:
    """Context manager installing :class:`_StopSignals` (kept for callers of the old helper)."""
    return _StopSignals(grace_seconds)


def _checkpoint_manager(directory: str, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def latest_checkpoint_step(workdir: str) -> int | None:
    """The step of the latest checkpoint in ``workdir/checkpoints`` (None if there is none)."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    manager = _checkpoint_manager(directory, keep=1)
    try:
        return manager.latest_step()
    finally:
        manager.close()


class CheckpointMismatch(RuntimeError):
    """No checkpoint of the workdir restores into the state of this run (its shapes or structure
    differ: the config changed, or every checkpoint is damaged)."""


def _restore_newest_good(manager, directory: str, target: PyTree):
    """Restores the newest checkpoint of ``manager`` that restores into ``target``.

    A checkpoint newer than the one restored that fails to restore (truncated or missing files) is
    moved aside to ``<workdir>/checkpoints.broken/<step>`` (never deleted), with one warning line
    naming it. If none restores, nothing is moved and :class:`CheckpointMismatch` names the newest
    error. Returns ``(state, step, moved)`` (``(None, None, [])`` without checkpoints).
    """
    import orbax.checkpoint as ocp

    steps = sorted(manager.all_steps(), reverse=True)
    failures: list[tuple[int, str]] = []
    for step in steps:
        try:
            state = manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as e:  # noqa: BLE001 - orbax/TensorStore raise many types
            failures.append((step, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                                   if str(e) else type(e).__name__))
            continue
        moved = []
        for bad, why in failures:
            broken = os.path.join(os.path.dirname(directory), "checkpoints.broken")
            os.makedirs(broken, exist_ok=True)
            dest = os.path.join(broken, str(bad))
            if os.path.exists(dest):
                dest += f".{time.strftime('%Y%m%d-%H%M%S')}"
            shutil.move(os.path.join(directory, str(bad)), dest)
            moved.append(dest)
            log.warning("checkpoint at step %d does not restore (%s): moved it to %s and "
                        "resumed from step %d", bad, why, dest, step)
        return state, step, moved
    if failures:
        step, why = failures[0]
        raise CheckpointMismatch(
            f"no checkpoint in {directory} restores into this run's state (newest: step {step}, "
            f"{why}); if the config changed, use a new --workdir or restart with "
            "--config.train.resume=False")
    return None, None, []


def train(
    *,
    workdir: str,
    state: TrainState,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    batch_fn: Callable[[int], np.ndarray | PyTree],
    total_steps: int,
    mesh: Mesh,
    micro_batches: int = 1,
    eval_fn: Callable[[PyTree, PyTree, PyTree], dict] | None = None,
    eval_batches: Sequence[PyTree] = (),
    eval_every: int = 0,
    log_every: int = 10,
    checkpoint_every: int = 0,
    keep_checkpoints: int = 3,
    learning_rate: Callable[[int], float] | None = None,
    tokens_per_step: int = 0,
    hooks: Sequence[Hook] = (),
    progress: bool | None = None,
    tensorboard: bool = True,
    stop_at: int = 0,
    stop_grace_seconds: float = 60.0,
    blas_threads: int | None = 1,
    metrics_lag: int = 1,
    step_fn: Callable[[TrainState, PyTree], tuple[TrainState, dict]] | None = None,
    replicas: Sequence[dict] | None = None,
) -> dict:
    """Trains ``state`` to ``total_steps`` and returns a results dict.

    Args:
      workdir: output directory (``metrics.jsonl``, ``checkpoints/``, ``tb/``).
      state: initial TrainState (replaced by the newest checkpoint in the workdir that restores;
        newer ones that do not are moved to ``checkpoints.broken/``). Its
        buffers are donated to the first step: copy arrays you want to reuse afterwards (e.g.
        ``jax.tree.map(jnp.copy, params)``) before calling ``train``.
      loss_fn: ``(params, frozen, micro_batch, rng) -> (loss, aux dict)``.
      optimizer: the optax transformation that built ``state.opt_state``.
      batch_fn: ``batch_fn(step)`` -> host batch with leading axis ``micro_batches * B`` (a pure
        function of the step for exact resume).
      total_steps: steps to train to (counted from 0, across resumes).
      mesh: device mesh (:func:`lrx.train.sharding.make_mesh`).
      micro_batches: gradient-accumulation steps per optimizer step.
      eval_fn: ``(params, frozen, batch) -> {'loss': ...}`` evaluated on each of ``eval_batches``
        every ``eval_every`` steps and at the end (means are logged with an ``eval_`` prefix).
      log_every, checkpoint_every, keep_checkpoints: cadence (0 disables periodic checkpoints;
        a final checkpoint is always written).
      learning_rate: schedule evaluated on the host for logging.
      tokens_per_step: for the tokens/s metric.
      hooks: ``hook(step, state, batch) -> (state, metrics or None)`` called after every step
        (``step`` = steps done, ``batch`` = the device batch of that step, leading axis
        ``micro_batches``); may replace the state (e.g. ReLoRA merges); its metrics are written to
        ``metrics.jsonl`` at that step and returned in ``hook_history``.
      progress: tqdm bar with loss, tokens/s and ETA (default: when stderr is a TTY); otherwise
        one log line every ``log_every`` steps.
      stop_at: if > 0, checkpoint and return after this step although ``total_steps`` is larger
        (a planned preemption: the schedule still spans ``total_steps``).
      stop_grace_seconds: after the first SIGTERM/SIGINT the run checkpoints at the next step
        boundary; if none comes within this many seconds, or a second signal arrives, the process
        exits at once naming the step (the last good checkpoint is kept).
      blas_threads: limit of the host BLAS thread pools (:func:`limit_blas_threads`); None leaves
        them alone.
      metrics_lag: the host reads a step's metrics (loss check, logging, progress) only after
        this many later steps are dispatched, so the device always has work queued and no step
        waits for a host round trip (0: read each step's metrics at once, blocking). Before a
        checkpoint, an evaluation and the end every pending step is read, so a non-finite loss
        still stops the run naming the *first* bad step, and no checkpoint holds its state.
        With a lag, a step's hook records reach ``metrics.jsonl`` before its train record.
      step_fn: the ``(state, batch) -> (state, metrics)`` step to compile instead of
        ``make_step(loss_fn, optimizer, micro_batches=micro_batches)`` (e.g. the per-layer step
        of :func:`lrx.train.per_layer.make_per_layer_step`; metrics need ``'loss'``).
      replicas: a sweep (:mod:`lrx.train.sweep`): ``state`` is replica-stacked
        (:func:`lrx.train.sweep.stack_states`, K replicas), ``optimizer`` a
        :func:`lrx.train.sweep.sweep_optimizer` and ``replicas`` one dict per replica describing
        it (e.g. ``{"lr": 1e-3, "seed": 0}``), copied into its metrics rows. The step is
        :func:`lrx.train.sweep.make_sweep_step` (unless ``step_fn``: then a vmapped step whose
        metrics have shape ``(K,)``), evaluation is vmapped, ``metrics.jsonl`` gets one row per
        replica (with its ``replica`` index), ``learning_rate`` is a sequence of K schedules,
        and a replica that diverges is reported (a ``diverged_at_step`` row) while the others
        continue; :class:`NonFiniteLoss` when every replica diverged.
    Returns:
      dict with the final ``state``, ``history`` (logged train metrics), ``eval_history``,
      ``memory`` (param/opt-state bytes, XLA memory analysis), throughput, ``stopped_by`` ('end',
      'SIGTERM', 'SIGINT'), ``resumed_from``, ``broken_checkpoints`` (moved aside) and wall time;
      with ``replicas``: ``final_eval`` and ``eval_history`` rows per replica and ``replicas``
      (each replica's dict plus ``diverged_at_step``, None while it trained to the end).
    Raises:
      NonFiniteLoss: at the first step with a non-finite loss, or when the state to checkpoint
        holds a non-finite value.
      CheckpointMismatch: when no checkpoint of the workdir restores into ``state``.
    """
    os.makedirs(workdir, exist_ok=True)
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    if metrics_lag < 0:
        raise ValueError(f"metrics_lag must be >= 0, got {metrics_lag}")
    if replicas is not None:
        replicas = [dict(r) for r in replicas]
        if len(replicas) != num_replicas(state):
            raise ValueError(f"replicas describes {len(replicas)} replicas, the state holds "
                             f"{num_replicas(state)}")
        if learning_rate is not None and (callable(learning_rate)
                                          or len(learning_rate) != len(replicas)):
            raise ValueError("with replicas, learning_rate is a sequence of one schedule per "
                             "replica (or None)")
    if blas_threads is not None:
        limit_blas_threads(blas_threads)
    with _StopSignals(stop_grace_seconds) as stop:
        return _train(stop, workdir=workdir, state=state, loss_fn=loss_fn, optimizer=optimizer,
                      batch_fn=batch_fn, total_steps=total_steps, mesh=mesh,
                      micro_batches=micro_batches, eval_fn=eval_fn, eval_batches=eval_batches,
                      eval_every=eval_every, log_every=log_every,
                      checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints,
                      learning_rate=learning_rate, tokens_per_step=tokens_per_step, hooks=hooks,
                      progress=progress, tensorboard=tensorboard, stop_at=stop_at,
                      metrics_lag=metrics_lag, step_fn=step_fn, replicas=replicas)


def _format_seconds(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ----------------------------------------------------------------------------------------------
# The parts of a run: shardings and resume, the compiled step, evaluation, checkpoints, metrics.
# ----------------------------------------------------------------------------------------------

def _state_shardings(state: TrainState, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """``(abstract state, shardings)``: the state's shapes and its NamedShardings on ``mesh``
    (step and rng replicated)."""
    abstract = jax.eval_shape(lambda s: s, state)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = shd.tree_shardings(abstract, mesh).replace(step=replicated, rng=replicated)
    return abstract, shardings


def _batch_putter(mesh: Mesh, micro_batches: int) -> Callable[[PyTree], PyTree]:
    """Host batch (leading axis ``micro_batches * B``) -> device batch of shape
    ``(micro_batches, B, ...)``, sharded over B."""
    def put(x):
        x = np.asarray(x)
        x = x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:])
        return shd.put_batch(x, shd.batch_sharding(mesh, x.ndim, batch_axis=1))
    return lambda host_batch: jax.tree_util.tree_map(put, host_batch)


def _all_finite(tree: PyTree) -> jax.Array:
    """Device-side scalar: every floating leaf of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


_all_finite_jit = jax.jit(_all_finite)


class _Checkpoints:
    """The run's orbax manager: resume from the newest checkpoint that restores, and saves that
    refuse a non-finite state."""

    def __init__(self, workdir: str, keep: int, stop: _StopSignals):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.keep = keep
        self.stop = stop
        stop.checkpoint_dir = self.directory
        self.manager = _checkpoint_manager(self.directory, keep)

    def restore(self, target: PyTree) -> tuple[TrainState | None, int | None, list[str]]:
        """:func:`_restore_newest_good` into ``target``; reopens the manager when it moved
        broken checkpoints aside (the manager caches the step list)."""
        restored, step, broken = _restore_newest_good(self.manager, self.directory, target)
        if broken:
            self.manager.close()
            self.manager = _checkpoint_manager(self.directory, self.keep)
        self.stop.last_checkpoint = step
        return restored, step, broken

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState) -> None:
        """Writes ``state`` and waits until it is on disk (a checkpoint counts as good then).
        Raises :class:`NonFiniteLoss` instead when any float in the state is not finite."""
        import orbax.checkpoint as ocp

        step = int(state.step)
        if not bool(_all_finite_jit(state)):
            raise NonFiniteLoss(step - 1, math.nan, what="state")
        self.manager.save(step, args=ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()
        self.stop.last_checkpoint = step

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _compile_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, micro_batches: int,
                  shardings: TrainState, mesh: Mesh, state: TrainState, batch: PyTree,
                  step: Callable | None = None):
    """The jit'd, state-donating step compiled for ``(state, batch)``, and the memory dict
    (param/frozen/opt-state bytes and counts, XLA memory analysis, compile seconds)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    if step is None:
        step = make_step(loss_fn, optimizer, micro_batches=micro_batches)
    step_fn = jax.jit(step,
                      in_shardings=(shardings, None), out_shardings=(shardings, replicated),
                      donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    memory = {"param_bytes": tree_bytes(state.params), "param_count": count_params(state.params),
              "frozen_bytes": tree_bytes(state.frozen),
              "frozen_count": count_params(state.frozen),
              "opt_state_bytes": tree_bytes(state.opt_state),
              "train_step": memory_report(compiled),
              "compile_seconds": time.perf_counter() - t0}
    log.info("param bytes %d, optimizer-state bytes %d, compiled step memory %s",
             memory["param_bytes"], memory["opt_state_bytes"], memory["train_step"])
    return compiled, memory


class _Evaluator:
    """Means of ``eval_fn`` over the eval batches (put on the mesh once), logged with an
    ``eval_`` prefix."""

    def __init__(self, eval_fn, eval_batches: Sequence[PyTree], mesh: Mesh,
                 replicas: Sequence[dict] | None = None, state: TrainState | None = None):
        self.enabled = eval_fn is not None and bool(eval_batches)
        self.history: list[dict] = []
        self.last: dict | list[dict] = {}
        self.replicas = replicas
        if not self.enabled:
            return
        if replicas is not None:  # one vmapped evaluation of every replica's parameters
            axes = replica_axes(state)
            eval_fn = jax.vmap(eval_fn, in_axes=(axes.params, axes.frozen, None))
        self.fn = jax.jit(eval_fn)
        self.batches = [jax.tree_util.tree_map(lambda x: shd.put_batch(
            np.asarray(x), shd.batch_sharding(mesh, np.ndim(x))), b) for b in eval_batches]

    def __call__(self, step: int, state: TrainState, writer: MetricWriter) -> None:
        results = [self.fn(state.params, state.frozen, b) for b in self.batches]
        if self.replicas is not None:
            means = {k: np.mean([np.asarray(r[k], np.float64) for r in results], axis=0)
                     for k in results[0]}
            self.last = []
            for i, info in enumerate(self.replicas):
                row = {"replica": i, **info, **{f"eval_{k}": float(v[i])
                                                for k, v in means.items()}}
                self.last.append(row)
                writer.write(step, row)
                self.history.append({"step": step, **row})
            return
        self.last = {f"eval_{k}": float(np.mean([float(r[k]) for r in results]))
                     for k in results[0]}
        writer.write(step, self.last)
        self.history.append({"step": step, **self.last})


class _StepMetrics:
    """Reads the steps' metrics on the host, ``lag`` steps behind the device.

    ``push`` keeps a dispatched step's metrics on the device; ``drain`` fetches those ``lag``
    steps old (their values are ready or nearly, so the device never idles waiting for the host)
    and ``flush`` fetches all. Each fetched step, in order: raises :class:`NonFiniteLoss` at the
    first non-finite loss, then adds the step to the logging window (every ``log_every`` steps
    one record of window means goes to ``metrics.jsonl``, ``history`` and the log or the bar).
    A step's time is from when it could start (dispatched and the previous step seen done) to
    when its metrics were seen.
    """

    def __init__(self, *, lag: int, start: int, total_steps: int, log_every: int,
                 tokens_per_step: int, learning_rate, writer: MetricWriter, bar,
                 replicas: Sequence[dict] | None = None, diverged: dict[int, int] | None = None):
        self.replicas = replicas
        self.diverged: dict[int, int] = dict(diverged or {})  # replica -> first bad step
        self.lag, self.start, self.total_steps = lag, start, total_steps
        self.log_every, self.tokens_per_step = log_every, tokens_per_step
        self.learning_rate, self.writer, self.bar = learning_rate, writer, bar
        self.pending: list[tuple[int, dict, float]] = []  # (step index, device metrics, dispatch t)
        self.window: list[dict] = []
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.seen = start                                 # steps whose metrics were read
        self._last_done = time.perf_counter()

    def fetch(self, metrics: dict) -> dict:
        """Blocks until ``metrics`` are on the host (a seam for tests)."""
        return jax.device_get(metrics)

    def push(self, index: int, metrics: dict) -> None:
        self.pending.append((index, metrics, time.perf_counter()))

    def restart_clock(self) -> None:
        """Host work between steps (checkpoint, eval) does not count as step time."""
        self._last_done = time.perf_counter()

    def drain(self, dispatched: int) -> None:
        """Reads every pending step at least ``lag`` steps older than ``dispatched``."""
        while self.pending and self.pending[0][0] < dispatched - self.lag:
            self._read(*self.pending.pop(0))

    def flush(self) -> None:
        while self.pending:
            self._read(*self.pending.pop(0))

    def _read(self, index: int, device_metrics: dict, dispatched_at: float) -> None:
        metrics = self.fetch(device_metrics)
        now = time.perf_counter()
        if self.replicas is not None:
            loss = self._check_replicas(index, metrics)
        else:
            loss = float(metrics["loss"])
        if not math.isfinite(loss):
            self.pending.clear()
            raise NonFiniteLoss(index, loss)
        dt = now - max(self._last_done, dispatched_at)
        self._last_done = now
        self.train_seconds += dt
        step = index + 1
        self.seen = step
        if self.replicas is not None:
            self.window.append({k: np.asarray(v, np.float64) for k, v in metrics.items()
                                if np.ndim(v) == 1} | {"step_time": dt})
        else:
            self.window.append({k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
                               | {"step_time": dt})
        if step % self.log_every == 0 or step == self.total_steps:
            self._log(step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}",
                                 tok_s=f"{self.tokens_per_step / max(dt, 1e-12):.0f}")

    def _check_replicas(self, index: int, metrics: dict) -> float:
        """Per-replica divergence: a replica whose loss is non-finite (or whose ``alive`` metric
        is 0, :func:`lrx.train.sweep.make_sweep_step`) is recorded as diverged at this step and
        logged; the others go on. Raises :class:`NonFiniteLoss` naming the replica when the step
        cannot hold a diverged replica back (no ``alive`` metric) or when every replica diverged.
        Returns the mean loss of the live replicas (for the progress bar)."""
        loss = np.asarray(metrics["loss"], np.float64)
        alive = np.asarray(metrics["alive"]) if "alive" in metrics else None
        for i, info in enumerate(self.replicas):
            if i in self.diverged or (math.isfinite(loss[i]) and (alive is None or alive[i] > 0)):
                continue
            name = f"replica {i} ({_describe(info)})"
            if alive is None:
                self.pending.clear()
                raise NonFiniteLoss(index, float(loss[i]), replica=name)
            self.diverged[i] = index
            log.warning("%s diverged at step %d (loss %s): kept at its last good state with "
                        "learning rate 0; the other replicas continue", name, index, loss[i])
            self.writer.write(index, {"replica": i, **info, "diverged_at_step": index})
        live = [i for i in range(len(self.replicas)) if i not in self.diverged]
        if not live:
            self.pending.clear()
            raise NonFiniteLoss(index, float(loss[0]), replica="every replica")
        return float(np.mean(loss[live]))

    def _log(self, step: int) -> None:
        if self.replicas is not None:
            return self._log_replicas(step)
        window, self.window = self.window, []
        record = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
        record["tokens_per_s"] = self.tokens_per_step / max(record["step_time"], 1e-12)
        if self.learning_rate is not None:
            record["lr"] = float(self.learning_rate(step - 1))
        self.writer.write(step, record)
        self.history.append({"step": step, **record})
        if self.bar is None and jax.process_index() == 0:
            eta = (self.total_steps - step) * self.train_seconds / max(step - self.start, 1)
            log.info("step %d/%d loss %.4f grad_norm %.3g tokens/s %.0f eta %s", step,
                     self.total_steps, record["loss"], record["grad_norm"],
                     record["tokens_per_s"], _format_seconds(eta))


    def _log_replicas(self, step: int) -> None:
        """One record per live replica (its window means, tagged with its ``replica`` index and
        description); ``tokens_per_s`` counts the tokens of every replica."""
        window, self.window = self.window, []
        step_time = float(np.mean([w["step_time"] for w in window]))
        keys = [k for k in window[-1] if k != "step_time"]
        means = {k: np.mean([w[k] for w in window if k in w], axis=0) for k in keys}
        losses = []
        for i, info in enumerate(self.replicas):
            if i in self.diverged:
                continue
            record = {"replica": i, **info, **{k: float(v[i]) for k, v in means.items()},
                      "step_time": step_time,
                      "tokens_per_s": self.tokens_per_step * len(self.replicas)
                      / max(step_time, 1e-12)}
            if self.learning_rate is not None:
                record["lr"] = float(self.learning_rate[i](step - 1))
            self.writer.write(step, record)
            self.history.append({"step": step, **record})
            losses.append(f"{record['loss']:.4f}")
        if self.bar is None and jax.process_index() == 0:
            eta = (self.total_steps - step) * self.train_seconds / max(step - self.start, 1)
            log.info("step %d/%d loss per replica [%s] eta %s", step, self.total_steps,
                     ", ".join(losses), _format_seconds(eta))


def _describe(info: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in info.items())


def _progress_bar(progress: bool | None, total_steps: int, start: int):
    use_bar = sys.stderr.isatty() if progress is None else progress
    if not use_bar or jax.process_index() != 0:
        return None
    from tqdm import tqdm

    return tqdm(total=total_steps, initial=start, dynamic_ncols=True, desc="train", unit="step")


def _train(stop: _StopSignals, *, workdir, state, loss_fn, optimizer, batch_fn, total_steps, mesh,
           micro_batches, eval_fn, eval_batches, eval_every, log_every, checkpoint_every,
           keep_checkpoints, learning_rate, tokens_per_step, hooks, progress, tensorboard,
           stop_at, metrics_lag, step_fn=None, replicas=None) -> dict:
    abstract, shardings = _state_shardings(state, mesh)
    checkpoints = _Checkpoints(workdir, keep_checkpoints, stop)
    writer = MetricWriter(workdir, tensorboard=tensorboard)
    target = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    try:
        restored, resumed_from, broken = checkpoints.restore(target)
    except CheckpointMismatch:
        checkpoints.close()
        writer.close()
        raise
    diverged: dict[int, int] = {}
    if resumed_from is not None:
        state = restored
        writer.truncate_after(resumed_from)
        log.info("resumed from checkpoint at step %d", resumed_from)
        diverged = {int(r["replica"]): int(r["diverged_at_step"]) for r in read_metrics(workdir)
                    if "diverged_at_step" in r}
    else:
        state = jax.device_put(state, shardings)
    start = int(state.step)
    stop.step = start

    put_batch = _batch_putter(mesh, micro_batches)
    batch = put_batch(batch_fn(start))
    if replicas is not None and step_fn is None:
        step_fn = make_sweep_step(loss_fn, optimizer, replica_axes(state),
                                  micro_batches=micro_batches)
    compiled, memory = _compile_step(loss_fn, optimizer, micro_batches, shardings, mesh, state,
                                     batch, step_fn)
    if replicas is not None:
        memory["replicas"] = len(replicas)
    evaluator = _Evaluator(eval_fn, eval_batches, mesh, replicas, state)
    bar = _progress_bar(progress, total_steps, start)
    metrics = _StepMetrics(lag=metrics_lag, start=start, total_steps=total_steps,
                           log_every=log_every, tokens_per_step=tokens_per_step,
                           learning_rate=learning_rate, writer=writer, bar=bar,
                           replicas=replicas, diverged=diverged)
    hook_history: list[dict] = []
    stopped_by = "end"
    step = start
    try:
        metrics.restart_clock()
        while step < total_steps:
            if stop.signal is not None:  # arrived before this step (e.g. while compiling)
                break
            state, step_metrics = compiled(state, batch)  # dispatched: runs while the host works
            metrics.push(step, step_metrics)
            used_batch = batch
            if step + 1 < total_steps:  # host-side batch prep overlaps the device's step
                batch = put_batch(batch_fn(step + 1))
            step += 1
            for hook in hooks:
                state, extra = hook(step, state, used_batch)
                if extra:
                    writer.write(step, extra)
                    hook_history.append({"step": step, **extra})
            metrics.drain(step)
            stop.step = step
            if evaluator.enabled and eval_every and (step % eval_every == 0
                                                     or step == total_steps):
                metrics.flush()
                evaluator(step, state, writer)
                metrics.restart_clock()
            if stop_at and step >= stop_at and step < total_steps and stop.signal is None:
                stop.signal = f"stop_at={stop_at}"
            if stop.signal is not None:
                break
            if checkpoint_every and step % checkpoint_every == 0 and step < total_steps:
                metrics.flush()  # the checkpoint follows only steps whose loss was seen finite
                checkpoints.save(state)
                metrics.restart_clock()
        metrics.flush()
        stop.acknowledge()  # a step boundary: a first signal from here on waits for the save
        if stop.signal is not None:
            stopped_by = stop.signal
            if not stopped_by.startswith("stop_at"):
                log.warning("%s received: saving a checkpoint at step %d and stopping",
                            stopped_by, step)
        if evaluator.enabled and (not evaluator.history or evaluator.history[-1]["step"] != step):
            evaluator(step, state, writer)
        if checkpoints.latest_step() != step:
            checkpoints.save(state)
    finally:
        checkpoints.close()
        writer.close()
        if bar is not None:
            bar.close()

    return {
        "state": state,
        "history": metrics.history,
        "eval_history": evaluator.history,
        "hook_history": hook_history,
        "final_eval": evaluator.last,
        "memory": memory | {"device_peak_bytes": device_peak_bytes(),
                            "host_peak_rss_bytes": host_peak_rss_bytes()},
        "steps_run": step - start,
        "tokens_per_s": (metrics.train_seconds and
                         tokens_per_step * (step - start) / metrics.train_seconds) or 0.0,
        "train_seconds": metrics.train_seconds,
        "stopped_by": stopped_by,
        "resumed_from": resumed_from,
        "broken_checkpoints": broken,
        "replicas": None if replicas is None else [
            {**info, "diverged_at_step": metrics.diverged.get(i)}
            for i, info in enumerate(replicas)],
    }
