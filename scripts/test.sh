#!/usr/bin/env bash
# Runs the whole test suite on CPU: sets up .venv (and .venv-ref for the HF fixtures) when needed,
# regenerates the HF reference fixtures if their generator changed, lints, then runs pytest with
# 8 virtual CPU devices (Pallas kernels run in interpret mode). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/fixtures.sh .cache/hf_fixtures
.venv/bin/ruff check .
export CROSSPOOL_REQUIRE_FIXTURES=1
export JAX_PLATFORMS=cpu
# LLVM at -O0 without its expensive passes: the suite compiles hundreds of small CPU programs and
# runs each a few steps, so compile time dominates (tests/test_model_classes.py 227 -> 149 s,
# tests/test_pooled_step.py 258 -> 174 s on this 2-core machine, 2026-12-05; the whole fresh-clone
# run 27.0 -> 20.2 min)
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# one compilation cache for the run (and later runs of this checkout): tests that build the same
# step program compile it once; subprocesses the tests start inherit it
export CROSSPOOL_COMPILATION_CACHE="${CROSSPOOL_COMPILATION_CACHE:-$PWD/.cache/jax-tests}"
# engines and runners the tests build compile only the programs their calls use (no background
# warm-ups at load, no fallback to a larger program meanwhile; warm_programs.WARM_PROGRAMS_ENV and
# step_programs.FALLBACK_ENV in crosspool_jax/execution/): on 2 cores those extra compiles compete
# with the tests' own (tests/test_pooled_engine.py 254 -> 136 s of CPU, 2026-12-07); the tests
# that rely on them ask for them explicitly (test_stall_free, test_sleep_wake, test_simulator,
# the Mosaic-fallback test)
export CROSSPOOL_WARM_PROGRAMS="${CROSSPOOL_WARM_PROGRAMS:-0}"
export CROSSPOOL_COMPILE_FALLBACK="${CROSSPOOL_COMPILE_FALLBACK:-off}"
# three worker processes on CI's 2-core machine (two left a core idle ~20% of the time: subprocess
# start-ups, servers waiting for ports, polls); CROSSPOOL_TEST_WORKERS overrides, 0 runs in this
# process. Test files are the unit of distribution, so a module's fixtures build once.
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "${CROSSPOOL_TEST_WORKERS:-3}" --dist loadfile "$@"
