"""The README's commands run as written on a CPU-only machine (no XLA_FLAGS device count, no downloads).

The commands of the README's "Use" block and its library example are read from README.md itself
and run in a scratch directory that holds links to the repo's `.venv` and `serving/` (so the
relative paths resolve as from the repo root). Servers are started, waited for until they say they
serve, then stopped with SIGTERM; their ports are replaced by free ones.
"""

from __future__ import annotations

import re
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import ROOT, env_without_device_count

README = (ROOT / "README.md").read_text()
CLI = ROOT / ".venv" / "bin" / "crosspool"
pytestmark = pytest.mark.skipif(not CLI.exists(), reason="needs the repo's .venv (scripts/bootstrap.sh)")


def _use_commands() -> list[str]:
    block = README.split("## Use", 1)[1].split("\n\n")
    return [ln.strip() for para in block for ln in para.splitlines()
            if ln.startswith("    .venv/bin/crosspool ")]


def _library_example() -> str:
    return README.split("```python\n", 1)[1].split("```", 1)[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return env_without_device_count(JAX_PLATFORMS="cpu")


def _serve_until_ready(cmd: list[str], cwd: Path, timeout: float = 240) -> str:
    """Starts a server, waits for its "serving on" line, stops it with SIGTERM; returns stdout."""
    p = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out = ""
    try:
        deadline = time.monotonic() + timeout
        assert p.stdout is not None
        while time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line and p.poll() is not None:
                break
            out += line
            if "serving on" in line:
                break
        assert "serving on" in out, f"{cmd}: {out}\n{p.stderr.read() if p.poll() is not None else ''}"
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err[-2000:]
    return out


def test_readme_lists_the_commands_this_test_runs() -> None:
    cmds = _use_commands()
    assert len(cmds) == 8 and cmds[1].startswith(".venv/bin/crosspool demo export demo-ckpt")
    assert "demo-ckpt" in _library_example()


def test_readme_commands_run_as_written(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    (tmp_path / "serving").symlink_to(ROOT / "serving")
    cmds = _use_commands()
    server_cmd, local, serve = cmds[0], cmds[1:6], cmds[6:]
    for cmd in local:
        p = subprocess.run(shlex.split(cmd.split("  #")[0]), cwd=tmp_path, env=_env(), capture_output=True,
                           text=True, timeout=300)
        assert p.returncode == 0, f"{cmd}\n{p.stderr[-2000:]}"
        assert "Traceback" not in p.stderr, p.stderr
    assert (tmp_path / "demo-ckpt" / "config.json").is_file()
    assert (tmp_path / "demo-crosspool").is_dir()

    for cmd in serve:
        argv = shlex.split(re.sub(r"--port \d+", f"--port {_free_port()}", cmd))
        out = _serve_until_ready(argv, tmp_path)
        assert "(mode crosspool" in out if "--pools 2+6" in cmd else "(mode shared" in out

    # the first command talks to the README's server command (scripts/serve.sh) on its address
    port = _free_port()
    server = subprocess.Popen(["bash", "scripts/serve.sh", "--port", str(port), "--no-warmup"], cwd=ROOT,
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + 240
        line = ""
        while time.monotonic() < deadline and "serving on" not in line:
            line = server.stdout.readline()
            assert line or server.poll() is None, "scripts/serve.sh exited"
        argv = shlex.split(server_cmd.replace("127.0.0.1:50051", f"127.0.0.1:{port}"))
        p = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        assert '"finish_reason"' in p.stdout
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=60)

    p = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", _library_example()], cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert 1 <= len(lines) <= 16 and lines[-1].split()[-1] in ("length", "stop"), p.stdout
