"""What a new user hits first: error exits without a process abort in every mode, eos ids outside the
vocabulary, virtual CPU devices asked for by the engine itself, the fixture generator's reload check.

Subprocesses run without XLA_FLAGS' device count (as from a user's shell), so the engine must ask JAX
for the virtual CPU devices a split needs (`conftest.env_without_device_count`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import HF_FIXTURES, ROOT, env_without_device_count

from crosspool_jax.models.config import UnreachableEosWarning, from_hf_config

CASE_A = "mixtral_gqa4x2_top2"  # vocab 97, 2 layers
CASE_B = "qwen3moe_gqa4x2_top2_fp16"  # vocab 151, 2 layers
needs_fixtures = pytest.mark.skipif(
    not (HF_FIXTURES / CASE_A).is_dir() or not (HF_FIXTURES / CASE_B).is_dir(),
    reason="run `bash scripts/fixtures.sh`",
)
ABORT_MARKS = ("terminate called", "FATAL", "Fatal Python error", "Segmentation fault", "core dumped")


def _env() -> dict[str, str]:
    return env_without_device_count(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return _run([sys.executable, "-m", "serving.cli", *args])


def _assert_no_abort(p: subprocess.CompletedProcess[str]) -> None:
    assert p.returncode >= 0, f"killed by signal {-p.returncode}: {p.stderr[-2000:]}"
    assert p.returncode not in (134, 139), p.stderr[-2000:]
    for mark in ABORT_MARKS:
        assert mark not in p.stderr, p.stderr[-2000:]


# An error raised while requests of several models are live (step programs compiling on the engine's
# worker thread): the process must exit with the Python error, never abort in XLA at interpreter exit.
_LIVE_ERROR_SCRIPT = """
import sys, time
from crosspool_jax.demo import demo_models
from crosspool_jax.engine import PooledEngine
from crosspool_jax.engine_api import make_request
mode, shutdown = sys.argv[1], sys.argv[2] == "shutdown"
engine = PooledEngine(mode=mode, pools={"crosspool": "2+2", "shared": "2", "static": "2"}[mode])
models = demo_models()
for name, m in models.items():
    engine.add_model(name, m.config, m.weights, m.tokenizer)
for name in models:
    engine.submit(make_request(name, [1, 2, 3], 24, stop_token_ids=[257]))
time.sleep(0.5)  # the worker is compiling the first step's programs now
try:
    raise RuntimeError("user code failed while requests were live")
finally:
    if shutdown:
        engine.shutdown(timeout=0)
"""


@pytest.mark.parametrize(
    ("mode", "shutdown"), [("crosspool", "no-shutdown"), ("shared", "no-shutdown"), ("static", "shutdown")]
)
def test_error_with_live_requests_exits_without_abort(mode: str, shutdown: str) -> None:
    p = _run([sys.executable, "-c", _LIVE_ERROR_SCRIPT, mode, shutdown])
    _assert_no_abort(p)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "RuntimeError: user code failed while requests were live" in p.stderr


@needs_fixtures
@pytest.mark.parametrize("mode", ["reference", "crosspool", "shared", "static"])
def test_cli_error_exit_in_every_mode(mode: str) -> None:
    """A bad request (an explicit stop id outside the vocabulary) with two models: one-line error,
    exit 2, in every mode; crosspool 2+2 needs 4 CPU devices the CLI asks JAX for itself."""
    pools = {"crosspool": ["--pools", "2+2"], "shared": ["--pools", "2"], "static": ["--pools", "2"]}
    p = _cli("generate", "--mode", mode, *pools.get(mode, []), "--model", str(HF_FIXTURES / CASE_A),
             "--model", str(HF_FIXTURES / CASE_B), "--prompt-ids", "1,2,3", "--stop-ids", "5000")
    _assert_no_abort(p)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1] == (
        "crosspool: error: stop token id 5000 is outside the vocabulary [0, 97)")


@needs_fixtures
def test_config_eos_outside_vocab_is_dropped_with_one_warning(tmp_path: Path) -> None:
    model = tmp_path / "eos5000"
    shutil.copytree(HF_FIXTURES / CASE_A, model)
    hf = json.loads((model / "config.json").read_text())
    eos = hf["eos_token_id"]
    hf["eos_token_id"] = [5000, eos]
    (model / "config.json").write_text(json.dumps(hf))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = from_hf_config(hf, source="eos5000/config.json")
    assert cfg.eos_token_ids == (eos,)
    assert [str(w.message) for w in caught if w.category is UnreachableEosWarning] == [
        "eos5000/config.json: eos id 5000 outside the vocabulary [0, 97) dropped (they can never be "
        "generated)"]

    # HF transformers generates from such a directory; so do we, in the reference and a pooled mode
    for mode in ("reference", "shared"):
        p = _cli("generate", "--mode", mode, "--model", str(model), "--model", str(HF_FIXTURES / CASE_B),
                 "--prompt-ids", "1,2,3", "--max-new-tokens", "4")
        _assert_no_abort(p)
        assert p.returncode == 0, p.stderr[-2000:]
        assert p.stderr.count("eos id 5000 outside the vocabulary") == 1, p.stderr
        lines = [json.loads(x) for x in p.stdout.splitlines()]
        assert [len(x["token_ids"]) <= 4 for x in lines] == [True, True]


def test_engine_asks_for_the_cpu_devices_a_split_needs() -> None:
    """`Engine(pools="4+4")` on a CPU-only machine, with no XLA_FLAGS: 8 virtual CPU devices."""
    script = (
        "import jax, crosspool_jax as cp\n"
        "e = cp.Engine(mode='crosspool', pools='4+4')\n"
        "print(len(jax.devices()), e.describe())\n"
        "e.shutdown()\n"
    )
    p = _run([sys.executable, "-c", script])
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("8 mode crosspool: 4+4 (kv: 0,1,2,3; weights: 4,5,6,7)"), p.stdout


def test_ensure_cpu_devices_after_jax_started_changes_nothing() -> None:
    import jax

    from crosspool_jax.memory.topology import devices_needed, ensure_cpu_devices

    jax.devices()
    assert not ensure_cpu_devices(64)
    assert [devices_needed(*a) for a in [("crosspool", "3+5"), ("crosspool", None), ("shared", "4"),
                                        ("static", None), ("crosspool", "x+y")]] == [8, 2, 4, 0, 0]


_REF_PY = ROOT / ".venv-ref" / "bin" / "python"


@pytest.mark.skipif(not _REF_PY.exists(), reason=".venv-ref (torch + transformers) is not set up")
def test_fixture_reload_check_uses_a_stated_tolerance() -> None:
    """The generator compares a reloaded checkpoint's logits within RELOAD_TOLERANCE (a torch kernel
    may reduce in another order on another CPU: 4.3e-6 was seen), and records it in the manifest."""
    script = (
        "import importlib.util, json, sys\n"
        "import numpy as np\n"
        f"path = {str(ROOT / 'tests/fixtures/hf_fixtures.py')!r}\n"
        "spec = importlib.util.spec_from_file_location('g', path)\n"
        "g = importlib.util.module_from_spec(spec); sys.modules['g'] = g; spec.loader.exec_module(g)\n"
        "rng = np.random.default_rng(0)\n"
        "ref = rng.normal(0, 2, (3, 23, 131)).astype(np.float32); ref[0, 7:] = 0\n"
        "near = ref + np.where(ref != 0, 4.29e-6, 0).astype(np.float32)\n"
        "far = ref * (1 + 1e-3)\n"
        "print(json.dumps([g.RELOAD_TOLERANCE, g.reload_error(near, ref), g.reload_error(far, ref)]))\n"
    )
    p = subprocess.run([str(_REF_PY), "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    tol, near, far = json.loads(p.stdout)
    assert tol == 1e-5
    assert near < tol < far
    manifest = HF_FIXTURES / "manifest.json"
    if manifest.is_file():
        assert json.loads(manifest.read_text())["thresholds"]["reload_max_relative_error"] == tol
