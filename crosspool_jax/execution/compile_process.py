"""Step programs lowered and compiled in a separate process, handed back as serialized executables.

Why: tracing and lowering a step program is Python work that holds the GIL; in the serving
process it kept the stepping thread waiting (docs/benchmarks.md, "The compile thread and the
GIL": ~90% of that phase at CPython's 5 ms switch interval, ~12% at 0.5 ms, single holds of 60-85
ms at either). A worker process does the whole build (trace, lower, XLA compile) and sends back
``jax.experimental.serialize_executable.serialize(compiled)``; the serving process only loads it
(`deserialize_and_load`), so the background compile thread mostly waits on a pipe.

What the worker needs of the arena: its shape, dtype, layout and the devices of its mesh
(`StoreShape`, built from an `ArenaStore` by `StoreShape.of`): the program takes the arena as an
argument, so no weights or KV cross the pipe, only the `StepSpec` (plain frozen dataclasses) and
the serialized executable.

The worker is started on first use (``python -m crosspool_jax.execution.compile_process``: a
fresh interpreter, never a fork of a process that holds accelerator state, and no re-import of the
caller's main module) over a socket pair, with the parent's environment, its JAX platform and
persistent compilation cache directory (not on CPU: `CPU_SERIALIZABLE`) and no preallocated
memory pool (`worker_environment`: the serving process owns the memory; the worker needs the
device only to compile for it). On GPU each worker, like each compile thread of the serving
process, compiles with an XLA kernel cache file of its own (`compile_cache` module doc), so
kernels that its programs repeat compile once. A `ProcessCompiler` holds up to `workers` of them (the
runner's `compile_workers`: its compile queue runs that many compiles at once, each waiting on
its own worker). A worker that dies or fails a job raises `CompileProcessError` in the caller,
which falls back to compiling in process (`GroupRunner`); the next job starts a new worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import socket
import subprocess
import sys
import threading
import traceback
from multiprocessing.connection import Connection
from typing import Any

import jax
import numpy as np

from pallas_kernels.page_layout import PoolLayout

START_TIMEOUT_S = 300.0  # the worker's first import of JAX (and CUDA init) on a loaded machine
# XLA:CPU splits a program's code into several LLVM modules compiled in parallel; a step program
# so split deserializes without some of its functions ("Function ..._fusion not found" on the
# first call, jax 0.11.2). One module serializes whole.
CPU_SERIALIZABLE = {"xla_cpu_parallel_codegen_split_count": 1}


class CompileProcessError(RuntimeError):
    """The compile worker failed a job or is gone (the message says which and why)."""


@dataclasses.dataclass(frozen=True)
class StoreShape:
    """What `pooled_step.build_step` / `input_shapes` read of an `ArenaStore`, without its arrays.

    device_ids: the mesh's devices in mesh order (`jax.Device.id`); arena_shape / arena_dtype: the
    global arena array's (all devices' pages stacked). Picklable; `mesh` / `sharding` are rebuilt
    from the ids in whichever process reads them."""

    device_ids: tuple[int, ...]
    num_kv: int
    weights_index_base: int
    layout: PoolLayout
    arena_shape: tuple[int, ...]
    arena_dtype: str

    @classmethod
    def of(cls, store: Any) -> StoreShape:
        return cls(tuple(int(d.id) for d in store.mesh.devices.flat), int(store.num_kv),
                   int(store.weights_index_base), store.layout, tuple(store.arena.shape),
                   str(store.arena.dtype))

    def __getstate__(self) -> dict[str, Any]:  # the fields only: devices do not pickle
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def num_devices(self) -> int:
        return len(self.device_ids)

    @functools.cached_property
    def mesh(self) -> jax.sharding.Mesh:
        from crosspool_jax.memory.arena import POOL_AXIS

        by_id = {d.id: d for d in jax.devices()}
        return jax.sharding.Mesh(np.array([by_id[i] for i in self.device_ids]), (POOL_AXIS,))

    @functools.cached_property
    def sharding(self) -> jax.sharding.NamedSharding:
        from crosspool_jax.memory.arena import POOL_AXIS

        return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(POOL_AXIS))


def compile_spec(spec: Any, shape: Any, platform: str,
                 compiler_options: dict[str, Any] | None) -> Any:
    """`spec`'s step program over an arena of `shape` (a `StoreShape`, or the `ArenaStore` itself:
    the same attributes), lowered and compiled here (jax.stages.Compiled). The one build of a step
    program, in the worker and in the serving process alike; on GPU with this thread's XLA
    kernel cache file (`compile_cache.compile_with_kernel_cache`)."""
    from crosspool_jax.execution.compile_cache import (
        compile_with_kernel_cache,
        kernel_cache_for_this_thread,
    )
    from crosspool_jax.execution.pooled_step import build_step, input_shapes

    arena = jax.ShapeDtypeStruct(shape.arena_shape, shape.arena_dtype, sharding=shape.sharding)
    lowered = build_step(spec, shape, platform).lower(arena, input_shapes(spec, shape))
    claim = kernel_cache_for_this_thread() if platform == "gpu" else None
    return compile_with_kernel_cache(lowered, compiler_options, claim)


def _compile_job(job: tuple) -> tuple:
    """One job's answer: ("ok", payload, in_tree, out_tree) or ("error", text)."""
    from jax.experimental.serialize_executable import serialize

    spec, shape, platform, options = job
    options = dict(options)
    if jax.default_backend() == "cpu":
        options = CPU_SERIALIZABLE | options
    try:
        return ("ok", *serialize(compile_spec(spec, shape, platform, options)))
    except Exception:  # every failure goes back to the caller as text
        return ("error", traceback.format_exc(limit=8))


def _worker_main(conn: Any, cache_dir: str | None) -> None:
    """The worker's loop: (spec, shape, platform, options) in, ("ok", payload, in_tree, out_tree)
    or ("error", text) out, until the pipe closes or None arrives."""
    if cache_dir and jax.default_backend() != "cpu":
        # (CPU: a cached entry may be a split program compiled by the serving process, whose key
        # does not see `CPU_SERIALIZABLE`; the worker compiles afresh there)
        from crosspool_jax.execution.compile_cache import enable_compilation_cache

        enable_compilation_cache(cache_dir)  # the serving process's directory and thresholds
    conn.send(("ready", jax.default_backend()))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(_compile_job(job))


def worker_environment(base: dict[str, str], backend: str) -> dict[str, str]:
    """The worker's environment: `base` (this process's, so the same platform is picked; only CPU
    is named, as "gpu" would also ask for rocm) with no preallocated memory pool (GPU: the platform
    allocator, no BFC pool beside the server's) and, on CPU, no persistent cache (`_worker_main`)."""
    env = dict(base) | {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    if backend in ("gpu", "cuda", "rocm"):
        # the platform itself is inherited: JAX_PLATFORMS=gpu would also ask for rocm and fail
        env["XLA_PYTHON_CLIENT_ALLOCATOR"] = "platform"
    if backend == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    return env


class _Worker:
    """One worker process and its end of the socket pair (started by `start`)."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.conn: Any = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        from crosspool_jax.execution.compile_cache import compilation_cache_dir

        parent_sock, child_sock = socket.socketpair()
        env = worker_environment(dict(os.environ), jax.default_backend())
        cmd = [sys.executable, "-m", __name__, str(child_sock.fileno()), compilation_cache_dir() or ""]
        proc = subprocess.Popen(cmd, env=env, pass_fds=(child_sock.fileno(),),
                                stdin=subprocess.DEVNULL, cwd=os.getcwd())
        child_sock.close()
        conn = Connection(parent_sock.detach())
        if not conn.poll(START_TIMEOUT_S):
            proc.kill()
            raise CompileProcessError(f"compile worker did not start within {START_TIMEOUT_S:.0f} s")
        try:
            msg = conn.recv()
        except EOFError as e:
            try:
                code = proc.wait(10.0)
            except subprocess.TimeoutExpired:
                code = None
            raise CompileProcessError(f"compile worker exited at start (exit code {code}; its "
                                      "traceback is on stderr)") from e
        if msg[0] != "ready":
            raise CompileProcessError(f"compile worker: unexpected first message {msg[0]!r}")
        self.proc, self.conn = proc, conn

    def run(self, job: tuple) -> tuple:
        """Sends one job, returns the worker's answer; a dead worker raises CompileProcessError
        (and is forgotten, so the next job starts a new one)."""
        if not self.alive:
            self.proc = None
            self.start()
        try:
            self.conn.send(job)
            return self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            proc, self.proc = self.proc, None
            code = proc.poll() if proc is not None else None
            raise CompileProcessError(f"compile worker gone (exit code {code})") from e

    def close(self) -> None:
        """Asks the worker to exit, killing it if it is still busy after 5 s. May run while
        another thread's job is in flight on this worker (that job then fails), so it works on
        its own reference to the process: the job's thread sets `self.proc` to None."""
        proc, conn = self.proc, self.conn
        self.proc = None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            conn.send(None)
        try:
            proc.wait(5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ProcessCompiler:
    """Up to `workers` compile worker processes (module doc). `compile(spec, shape, platform,
    options)` takes an idle worker (waiting while all are busy), blocks the calling thread
    (waiting on a pipe, GIL released) and returns a loaded executable on the devices of `shape`'s
    mesh. Thread-safe: `workers` threads compile at once; `close()` ends the workers."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()  # the warmest worker first
        self._all = [_Worker() for _ in range(workers)]
        for w in reversed(self._all):
            self._idle.put(w)
        self._lock = threading.Lock()
        self.jobs = 0

    def start(self) -> None:
        """Starts every worker now rather than on its first job (benchmarks keep the start-up
        out of what they time)."""
        for w in self._all:
            if not w.alive:
                w.start()

    def compile(self, spec: Any, shape: StoreShape, platform: str,
                compiler_options: dict[str, Any] | None = None) -> Any:
        from jax.experimental.serialize_executable import deserialize_and_load

        worker = self._idle.get()
        try:
            msg = worker.run((spec, shape, platform, dict(compiler_options or {})))
        finally:
            self._idle.put(worker)
        with self._lock:
            self.jobs += 1
        if msg[0] == "error":
            raise CompileProcessError(f"compile worker failed:\n{msg[1]}")
        _, payload, in_tree, out_tree = msg
        return deserialize_and_load(payload, in_tree, out_tree,
                                    execution_devices=list(shape.mesh.devices.flat))

    def close(self) -> None:
        for w in self._all:
            w.close()


def _main(argv: list[str]) -> None:
    """The worker's entry point: ``python -m crosspool_jax.execution.compile_process FD CACHE_DIR``."""
    _worker_main(Connection(int(argv[0])), argv[1] if len(argv) > 1 and argv[1] else None)


if __name__ == "__main__":
    _main(sys.argv[1:])

__all__ = ["CompileProcessError", "ProcessCompiler", "StoreShape", "compile_spec", "worker_environment"]
