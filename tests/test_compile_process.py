"""Step programs compiled in a worker process (`execution.compile_process`,
`GroupRunner(compile_process=)`)."""

from __future__ import annotations

import pickle
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crosspool_jax.demo import demo_models
from crosspool_jax.execution.compile_process import (
    CompileProcessError,
    ProcessCompiler,
    StoreShape,
    compile_spec,
    worker_environment,
)
from crosspool_jax.execution.pool_runner import GroupRunner
from crosspool_jax.execution.pooled_step import input_shapes
from crosspool_jax.execution.sampling import SamplingParams
from pallas_kernels.page_layout import PoolLayout

PROMPT = [3 + (7 * i) % 200 for i in range(37)]


def _runner(compile_process: bool, warm_programs: int = 2, compile_workers: int = 1) -> GroupRunner:
    m = demo_models()["demo-mixtral"]
    r = GroupRunner(None, PoolLayout(16384, "float32", 64, 256), 128, colocated=jax.devices()[0],
                    platform="cpu", backend="reference", prefill_chunk=16, max_prefill_tokens=16,
                    warm_programs=warm_programs, compile_process=compile_process,
                    compile_workers=compile_workers)
    r.add_model("a", m.config, m.weights)
    return r


def _generate(r: GroupRunner, params: dict[str, SamplingParams]) -> dict[str, list[int]]:
    """Submits one request per entry of `params` at once and steps until all are done."""
    for rid, p in params.items():
        r.submit(rid, "a", PROMPT, 6, p)
    toks: dict[str, list[int]] = {rid: [] for rid in params}
    while r.has_work:
        for rid, got in r.step().tokens.items():
            toks[rid] += got
    return toks


def test_store_shape_pickles_and_rebuilds_the_mesh():
    r = _runner(False)
    shape = StoreShape.of(r.store)
    back = pickle.loads(pickle.dumps(shape))
    assert back == shape
    assert back.num_devices == 1 and back.arena_shape == tuple(r.store.arena.shape)
    assert list(back.mesh.devices.flat) == list(r.store.mesh.devices.flat)
    for spec in r.warm_specs("a"):  # the program's inputs as the store's
        assert input_shapes(spec, back) == input_shapes(spec, r.store)


def test_worker_process_programs_generate_the_same_tokens():
    """Two workers: the warm-up's two programs compile at once, one in each (the serving-path
    compiles of the request's own shapes go to whichever worker is idle)."""
    params = {"g": SamplingParams(), "s": SamplingParams(temperature=0.8, top_k=20, seed=5)}
    want = _generate(_runner(False, 0), params)
    r = _runner(True, 2, compile_workers=2)
    got = _generate(r, params)
    assert got == want and len(want["g"]) == 6 == len(want["s"])
    assert r.process_compiles >= 2 and r.process_compile_failures == 0
    pids = {w.proc.pid for w in r._process_compiler._all if w.alive}
    assert len(pids) == 2  # both workers were used
    r._process_compiler.close()
    with pytest.raises(ValueError, match="compile_workers"):
        _runner(False, 0, compile_workers=0)


def test_worker_restarts_after_dying_and_matches_a_local_compile():
    r = _runner(False)
    spec = r.warm_specs("a")[0]
    shape = StoreShape.of(r.store)
    pc = ProcessCompiler()
    try:
        first = pc.compile(spec, shape, "cpu")
        pc._all[0].proc.kill()
        pc._all[0].proc.wait()
        again = pc.compile(spec, shape, "cpu")  # a new worker
        assert pc.jobs == 2
    finally:
        pc.close()
    local = compile_spec(spec, shape, "cpu", None)
    ins = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype, device=s.sharding), input_shapes(spec, r.store))
    outs = [prog(jnp.copy(r.store.arena), ins)[1] for prog in (local, first, again)]
    for o in outs[1:]:
        for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(o), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_close_while_a_job_is_in_flight_ends_the_worker_and_fails_the_job():
    """The runner may close its compiler while a background compile is running (CI saw the job's
    thread and `close` race over the worker's process handle)."""
    r = _runner(False)
    spec, shape = r.warm_specs("a")[0], StoreShape.of(r.store)
    pc = ProcessCompiler()
    pc.start()
    errors: list[BaseException] = []

    def job() -> None:
        try:
            pc.compile(spec, shape, "cpu")
        except CompileProcessError as e:
            errors.append(e)

    t = threading.Thread(target=job)
    t.start()
    time.sleep(0.5)  # the job is sent; the worker is compiling
    pc.close()
    t.join(60.0)
    assert not t.is_alive()
    assert not any(w.alive for w in pc._all)
    assert pc.jobs + len(errors) == 1  # the job either finished before the close or failed


def test_worker_failure_is_reported_and_the_runner_compiles_locally(monkeypatch):
    pc = ProcessCompiler()
    try:
        with pytest.raises(CompileProcessError, match="compile worker failed"):
            pc.compile("not a spec", StoreShape((0,), 1, 0, PoolLayout(16384, "float32", 64, 4),
                                                (4, 256, 64), "float32"), "cpu")
    finally:
        pc.close()

    def broken(*args, **kwargs):
        raise CompileProcessError("worker gone (test)")

    r = _runner(True, 0)
    monkeypatch.setattr(r._process_compiler, "compile", broken)
    assert len(_generate(r, {"g": SamplingParams()})["g"]) == 6
    assert r.process_compiles == 0 and r.process_compile_failures >= 2


def test_worker_environment():
    base = {"PATH": "/bin", "JAX_COMPILATION_CACHE_DIR": "/c", "XLA_FLAGS": "--x"}
    cpu = worker_environment(base, "cpu")
    # a CPU program the serving process cached may be split (not serializable): no cache there
    assert "JAX_COMPILATION_CACHE_DIR" not in cpu and cpu["XLA_FLAGS"] == "--x"
    assert cpu["JAX_PLATFORMS"] == "cpu" and cpu["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    gpu = worker_environment(base, "gpu")
    assert gpu["JAX_COMPILATION_CACHE_DIR"] == "/c" and gpu["XLA_PYTHON_CLIENT_ALLOCATOR"] == "platform"
    assert "JAX_PLATFORMS" not in gpu  # inherited: "gpu" would also ask for rocm (failed on the H200)
    assert base["JAX_COMPILATION_CACHE_DIR"] == "/c"  # the caller's mapping is left alone


def test_engine_defaults_compile_in_worker_processes_on_gpu_only():
    """`EngineConfig.compile_process` / `compile_workers` left None: on GPU, worker processes,
    `GPU_COMPILE_WORKERS` per engine shared among its device groups (at least one each); on CPU one
    compile thread; whatever is set is kept."""
    from crosspool_jax.engine import GPU_COMPILE_WORKERS, EngineConfig, resolve_config

    def pick(cfg: EngineConfig, platform: str, groups: int = 1) -> tuple[bool, int]:
        r = resolve_config(cfg, platform, groups)
        return r.compile_process, r.compile_workers

    assert GPU_COMPILE_WORKERS == 4
    assert pick(EngineConfig(), "gpu") == (True, 4)
    assert pick(EngineConfig(), "gpu", 2) == (True, 2)
    assert pick(EngineConfig(), "gpu", 8) == (True, 1)
    assert pick(EngineConfig(), "cpu") == (False, 1)
    assert pick(EngineConfig(), "cpu", 8) == (False, 1)
    assert pick(EngineConfig(compile_process=False), "gpu") == (False, 1)
    assert pick(EngineConfig(compile_process=True), "cpu") == (True, 1)
    assert pick(EngineConfig(compile_workers=3), "gpu", 8) == (True, 3)
