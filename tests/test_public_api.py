"""The package's public API (`import crosspool_jax as cp`) and the runnable example of docs/engine.md."""

from __future__ import annotations

import re
import subprocess
import sys

import crosspool_jax as cp
from tests.conftest import ROOT, env_without_device_count


def test_every_public_name_resolves_to_its_module_object():
    from crosspool_jax import engine, engine_api
    from crosspool_jax.execution import sampling

    assert sorted(cp.__all__) == sorted(cp._EXPORTS)
    for name in cp.__all__:
        assert getattr(cp, name) is not None
    assert cp.Engine is engine.PooledEngine
    assert cp.make_request is engine_api.make_request
    assert cp.SamplingParams is sampling.SamplingParams
    assert set(cp.__all__) <= set(dir(cp))


def test_unknown_name_is_an_attribute_error():
    try:
        cp.NoSuchThing  # noqa: B018
    except AttributeError as e:
        assert "NoSuchThing" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_docs_engine_example_runs():
    """The python block of docs/engine.md, run as written in its own process (no device count in
    XLA_FLAGS: the engine asks for the 8 CPU devices)."""
    text = (ROOT / "docs" / "engine.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    env = env_without_device_count(PYTHONPATH=str(ROOT))  # the engine asks for its devices
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    finals = [ln for ln in lines if ln.rstrip().endswith(("length", "stop"))]
    assert len(finals) == 2, out.stdout  # one final event per request
    for rid_prefix in {ln.split()[0] for ln in finals}:
        idx = [int(ln.split()[1]) for ln in lines if ln.split()[0] == rid_prefix]
        idx = [i for i in idx if i >= 0]  # -1: a final event without a token
        assert idx == list(range(len(idx))) and 1 <= len(idx) <= 8
    assert "EngineStats(" in out.stdout
