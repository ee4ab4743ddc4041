"""Test set-up: 8 host CPU devices (for sharded load/restore tests), set before jax is imported."""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
HF_FIXTURES = pathlib.Path(os.environ.get("CROSSPOOL_HF_FIXTURES", ROOT / ".cache" / "hf_fixtures"))


def pytest_configure(config: pytest.Config) -> None:
    # scripts/test.sh (and so CI) builds the fixtures first and sets this: there, missing fixtures
    # are an error, never a silent skip.
    if os.environ.get("CROSSPOOL_REQUIRE_FIXTURES") == "1" and not (HF_FIXTURES / "manifest.json").is_file():
        raise pytest.UsageError(f"HF fixtures missing at {HF_FIXTURES}: run `bash scripts/fixtures.sh`")


def env_without_device_count(**extra: str) -> dict[str, str]:
    """os.environ for a subprocess that must find its CPU devices itself, as from a user's shell:
    the device-count flag is taken out of XLA_FLAGS; the suite's compile-speed flags
    (scripts/test.sh) stay, since they roughly halve a CPU subprocess's compile time. `extra`: more
    variables."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if flags.strip():  # XLA reads a blank XLA_FLAGS as a file name
        env["XLA_FLAGS"] = " ".join(flags.split())
    return env | extra


def fixture_cases() -> list[dict]:
    """The cases of the HF fixture manifest (empty when the fixtures were not generated)."""
    path = HF_FIXTURES / "manifest.json"
    return json.loads(path.read_text())["cases"] if path.is_file() else []


@pytest.fixture(autouse=True)
def _end_dropped_compile_queues():
    """After each test: a GroupRunner the test dropped but a reference cycle keeps alive would go on
    compiling its queued warm-ups in the background, taking CPU from the next tests; collecting it
    runs its finalizer (`CompileQueue.shutdown`). Only when a compile thread is still alive."""
    yield
    import gc
    import threading

    if any(t.name == "step-compile" for t in threading.enumerate()):
        gc.collect()


# Files with the longest total time in a fresh-clone run (`--durations=0`, 2026-12-07: every file
# over 40 s), slowest first. They run first, so the xdist workers (scripts/test.sh: `--dist
# loadfile`) take them in turn and end together instead of one worker starting a long file when the
# others are nearly done.
SLOW_FILES = ("test_pooled_engine.py", "test_pooled_step.py", "test_stall_free.py",
              "test_model_classes.py", "test_reference_parity.py", "test_error_exits.py",
              "test_attention_kernels_step.py", "test_sleep_wake.py", "test_host_step.py",
              "test_multihost.py", "test_mixed_steps.py", "test_prefill_matmul_bench.py",
              "test_pooled_step_inplace.py", "test_compile_process.py", "test_lse.py", "test_decode.py",
              "test_bench_runner.py", "test_readme.py", "test_prefill.py", "test_simulator.py",
              "test_mla_decode_mgpu.py", "test_prefill_mgpu.py", "test_overlap.py",
              "test_prefill_bench.py", "test_lowering_time_bench.py", "test_mla_prefill_mgpu.py",
              "test_arena_matmul_mgpu_ws.py", "test_hf_export.py", "test_engine_groups.py",
              "test_arena_matmul.py", "test_static_live.py", "test_public_api.py",
              "test_serving_pooled.py", "test_compile_queue.py", "test_prefill_attention_bench.py",
              "test_append.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda it: rank.get(it.path.name, len(SLOW_FILES)))  # stable: order within a file
