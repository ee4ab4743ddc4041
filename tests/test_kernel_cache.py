"""Each compiling thread's own XLA kernel cache file (`compile_cache` module doc): slots claimed
with a lock, the option kept out of JAX's persistent-cache key, a failed compile retried without
the file. XLA:CPU has no kernel cache, so what runs here is the plumbing; the cache's effect on a
GPU compile is measured by `benchmarks/gpu_compile.sh` (docs/benchmarks.md)."""

from __future__ import annotations

import gc
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import cache_key, compiler

from crosspool_jax.execution import compile_cache as cc
from crosspool_jax.execution import compile_process as cp


def test_slots_are_claimed_one_process_each(tmp_path):
    first = cc.claim_kernel_cache(str(tmp_path))
    second = cc.claim_kernel_cache(str(tmp_path))
    assert first is not None and second is not None
    root = tmp_path / cc.KERNEL_CACHE_DIR
    assert (first.path, second.path) == (str(root / "slot-0.bin"), str(root / "slot-1.bin"))
    first.release()  # its lock drops with the descriptor: the slot is free again
    again = cc.claim_kernel_cache(str(tmp_path))
    assert again is not None and again.path == first.path
    for claim in (second, again):
        claim.release()


def test_a_claim_keeps_earlier_kernels_unless_too_large(tmp_path, monkeypatch):
    root = tmp_path / cc.KERNEL_CACHE_DIR
    root.mkdir()
    (root / "slot-0.bin").write_bytes(b"k" * 100)
    claim = cc.claim_kernel_cache(str(tmp_path))
    assert (root / "slot-0.bin").read_bytes() == b"k" * 100  # a later process reuses them
    claim.discard()
    assert not (root / "slot-0.bin").exists()
    claim.discard()  # nothing to delete: no error
    claim.release()
    (root / "slot-0.bin").write_bytes(b"k" * 100)
    monkeypatch.setattr(cc, "KERNEL_CACHE_MAX_BYTES", 99)
    cc.claim_kernel_cache(str(tmp_path)).release()
    assert not (root / "slot-0.bin").exists()


def test_no_slot_when_all_are_held_or_the_directory_is_not_writable(tmp_path, monkeypatch):
    monkeypatch.setattr(cc, "KERNEL_CACHE_SLOTS", 2)
    held = [cc.claim_kernel_cache(str(tmp_path)) for _ in range(2)]
    assert cc.claim_kernel_cache(str(tmp_path)) is None
    for claim in held:
        claim.release()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cc.claim_kernel_cache(str(blocker)) is None  # a file where the directory would go


def test_setting(monkeypatch):
    monkeypatch.delenv(cc.KERNEL_CACHE_ENV, raising=False)
    assert cc.kernel_cache_wanted()
    monkeypatch.setenv(cc.KERNEL_CACHE_ENV, "off")
    assert not cc.kernel_cache_wanted()
    monkeypatch.setenv(cc.KERNEL_CACHE_ENV, "sometimes")
    with pytest.raises(ValueError, match=cc.KERNEL_CACHE_ENV):
        cc.kernel_cache_wanted()


def _key(options: dict) -> str:
    lowered = jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(4))
    compile_options = compiler.get_compile_options(1, 1, env_options_overrides=options)
    devices = np.array([[jax.devices()[0]]])
    return cache_key.get(lowered.compiler_ir("stablehlo"), devices, compile_options,
                         jax.devices()[0].client)


def test_the_file_is_kept_out_of_the_persistent_cache_key(monkeypatch):
    monkeypatch.setattr(cache_key, "env_override_flags_to_exclude_from_cache_key",
                        set(cache_key.env_override_flags_to_exclude_from_cache_key))
    with_file = {cc.KERNEL_CACHE_OPTION: "/cache/xla_kernel_caches/slot-3.bin"}
    other_file = {cc.KERNEL_CACHE_OPTION: "/cache/xla_kernel_caches/slot-0.bin"}
    assert _key(with_file) != _key({})  # JAX alone keys each file's copy apart
    assert cc.exclude_kernel_cache_from_key()
    assert _key(with_file) == _key(other_file) == _key({})
    # other options still count
    assert _key({"xla_cpu_parallel_codegen_split_count": 1}) != _key({})


def test_xla_takes_the_option_per_compile(tmp_path):
    path = str(tmp_path / "slot-0.bin")
    out = jax.jit(lambda x: x * 2 + 1).lower(jnp.ones(4)).compile(
        compiler_options={cc.KERNEL_CACHE_OPTION: path})(jnp.ones(4))
    np.testing.assert_array_equal(np.asarray(out), np.full(4, 3.0))


class _Claim:
    def __init__(self):
        self.path, self.discarded = "/cache/slot-0.bin", 0

    def discard(self):
        self.discarded += 1


class _Lowered:
    """`compile` raising each of `errors` in turn, then returning "compiled"; records the options
    of every attempt."""

    def __init__(self, errors: list[str]):
        self.errors, self.seen = list(errors), []

    def compile(self, compiler_options=None):
        self.seen.append(compiler_options)
        if self.errors:
            raise RuntimeError(self.errors.pop(0))
        return "compiled"


def test_a_compile_that_fails_on_the_cache_retries_without_it():
    claim, low = _Claim(), _Lowered(["could not parse the kernel cache file"])
    assert cc.compile_with_kernel_cache(low, {"a": 1}, claim) == "compiled"
    assert low.seen == [{"a": 1, cc.KERNEL_CACHE_OPTION: claim.path}, {"a": 1}]
    assert claim.discarded == 1


def test_other_failures_are_not_retried():
    claim, low = _Claim(), _Lowered(["shared memory exceeded"])
    with pytest.raises(RuntimeError, match="shared memory"):
        cc.compile_with_kernel_cache(low, None, claim)
    assert len(low.seen) == 1 and claim.discarded == 0
    low = _Lowered(["kernel cache broken", "kernel cache broken again"])
    with pytest.raises(RuntimeError, match="again"):
        cc.compile_with_kernel_cache(low, None, claim)
    assert len(low.seen) == 2
    low = _Lowered([])
    assert cc.compile_with_kernel_cache(low, None, None) == "compiled" and low.seen == [None]


def _fresh_thread_state(monkeypatch):
    monkeypatch.setattr(cc, "_thread_claims", threading.local())


def test_no_kernel_cache_on_cpu(tmp_path, monkeypatch):
    assert jax.default_backend() == "cpu"
    _fresh_thread_state(monkeypatch)
    monkeypatch.setattr(cc, "compilation_cache_dir", lambda: str(tmp_path))
    assert cc.kernel_cache_for_this_thread() is None
    assert not (tmp_path / cc.KERNEL_CACHE_DIR).exists()
    # the worker's jobs compile without it (XLA:CPU has none), with the CPU worker's option
    monkeypatch.setattr(cp, "compile_spec", lambda spec, shape, platform, options: options)
    import jax.experimental.serialize_executable as se
    monkeypatch.setattr(se, "serialize", lambda compiled: (compiled, "in", "out"))
    assert cp._compile_job(("spec", "shape", "cpu", {})) == ("ok", cp.CPU_SERIALIZABLE, "in",
                                                             "out")


def test_each_compiling_thread_claims_its_own_slot(tmp_path, monkeypatch):
    """As on a GPU (the backend check stubbed): a thread's first call claims a slot and later
    calls return it; another thread gets another slot, freed when that thread ends; with the
    setting off, or JAX's own kernel cache on, none."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(cc, "compilation_cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(cache_key, "env_override_flags_to_exclude_from_cache_key",
                        set(cache_key.env_override_flags_to_exclude_from_cache_key))
    _fresh_thread_state(monkeypatch)
    claim = cc.kernel_cache_for_this_thread()
    assert claim is not None and claim.path.endswith("slot-0.bin")
    assert cc.kernel_cache_for_this_thread() is claim
    assert cc.KERNEL_CACHE_OPTION in cache_key.env_override_flags_to_exclude_from_cache_key
    other: list = []
    t = threading.Thread(target=lambda: other.append(cc.kernel_cache_for_this_thread().path))
    t.start()
    t.join()
    assert other == [claim.path.replace("slot-0", "slot-1")]
    gc.collect()  # the thread's claim went with it: its slot is free again
    again = cc.claim_kernel_cache(str(tmp_path))
    assert again.path == other[0]
    again.release()
    claim.release()
    _fresh_thread_state(monkeypatch)
    with monkeypatch.context() as mp:
        mp.setenv(cc.KERNEL_CACHE_ENV, "off")
        assert cc.kernel_cache_for_this_thread() is None
    _fresh_thread_state(monkeypatch)
    saved = jax.config.jax_persistent_cache_enable_xla_caches
    jax.config.update("jax_persistent_cache_enable_xla_caches", "all")
    try:
        assert cc.kernel_cache_for_this_thread() is None
    finally:
        jax.config.update("jax_persistent_cache_enable_xla_caches", saved)
