"""Launchers for multi-host CrossPool: a TPU pod slice, a SLURM GPU cluster, a Kubernetes cluster.

Every host of a multi-host engine runs the same command, `crosspool serve --coordinator HOST:PORT
--num-processes N --process-id I ...` (docs/deploy.md), with its own process id; process 0 is the
leader (it listens for clients), the others are followers. This tool prints (`--dry-run`) or runs
those commands:

    python -m deploy.launch tpu --config deploy/tpu_v5e16.toml --dry-run
    python -m deploy.launch slurm --config deploy/gpu_2x8.toml --dry-run
    python -m deploy.launch k8s --manifest deploy/k8s/crosspool.yaml --dry-run

`tpu` starts one `gcloud compute tpus tpu-vm ssh --worker=I` per host of the slice; `slurm` submits
`deploy/slurm/crosspool.sbatch` (its `--dry-run` prints the per-node commands the job's `srun`
runs); `k8s` reads the indexed Job of the manifest and prints each pod's command (`kubectl apply`
without `--dry-run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
SBATCH = ROOT / "deploy" / "slurm" / "crosspool.sbatch"
DEFAULT_COORDINATOR_PORT = 8476


class LaunchError(ValueError):
    """A config or manifest that does not describe a launchable group."""


@dataclasses.dataclass(frozen=True)
class SliceShape:
    """A TPU slice's hosts (one process each) and the chips each host holds."""

    hosts: int
    chips_per_host: int

    @property
    def chips(self) -> int:
        return self.hosts * self.chips_per_host


# Cloud TPU slice names (the number counts chips on v5e/v6e, TensorCores on v4/v5p: 2 per chip);
# single-host slices are listed too, where `crosspool serve` needs no coordinator.
SLICES: dict[str, SliceShape] = {
    "v5e-1": SliceShape(1, 1), "v5e-4": SliceShape(1, 4), "v5e-8": SliceShape(1, 8),
    "v5e-16": SliceShape(4, 4), "v5e-32": SliceShape(8, 4), "v5e-64": SliceShape(16, 4),
    "v5e-128": SliceShape(32, 4), "v5e-256": SliceShape(64, 4),
    "v6e-1": SliceShape(1, 1), "v6e-4": SliceShape(1, 4), "v6e-8": SliceShape(1, 8),
    "v6e-16": SliceShape(4, 4), "v6e-32": SliceShape(8, 4), "v6e-64": SliceShape(16, 4),
    "v6e-256": SliceShape(64, 4),
    "v4-8": SliceShape(1, 4), "v4-16": SliceShape(2, 4), "v4-32": SliceShape(4, 4), "v4-64": SliceShape(8, 4),
    "v5p-8": SliceShape(1, 4), "v5p-16": SliceShape(2, 4), "v5p-32": SliceShape(4, 4),
    "v5p-64": SliceShape(8, 4),
}


def slice_shape(name: str) -> SliceShape:
    """The hosts x chips of a slice name ("v5e-16"; "v5litepod-16" is read as "v5e-16")."""
    key = name.strip().lower().replace("v5litepod", "v5e")
    if key not in SLICES:
        raise LaunchError(f"unknown TPU slice {name!r}; known: {', '.join(SLICES)}")
    return SLICES[key]


def serve_command(coordinator: str, num_processes: int, process_id: int, serve_args: Sequence[str],
                  crosspool: str = "crosspool") -> list[str]:
    """The argv one host runs: `crosspool serve --coordinator HOST:PORT --num-processes N
    --process-id I` followed by `serve_args` (models, pools, port...)."""
    if not 0 <= process_id < num_processes:
        raise LaunchError(f"process id {process_id} outside [0, {num_processes})")
    return [crosspool, "serve", "--coordinator", coordinator, "--num-processes", str(num_processes),
            "--process-id", str(process_id), *serve_args]


def _load_toml(path: str | pathlib.Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise LaunchError(f"{path}: {e}") from None


def _serve_args(cfg: dict[str, Any], path: Any) -> list[str]:
    args = cfg.get("serve", {}).get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise LaunchError(f"{path}: [serve] args must be a list of strings")
    for a in args:
        if a in ("--coordinator", "--num-processes", "--process-id"):
            raise LaunchError(f"{path}: [serve] args must not set {a}: the launcher sets it per host")
    return args


# ---- TPU pod slice ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TpuPlan:
    """One `gcloud compute tpus tpu-vm ssh --worker=I` per host of the slice."""

    tpu_name: str
    zone: str
    project: str | None
    shape: SliceShape
    coordinator_host: str | None  # worker 0's internal address; None: asked of gcloud at launch
    coordinator_port: int
    workdir: str
    crosspool: str
    serve_args: tuple[str, ...]

    def describe_command(self) -> list[str]:
        """gcloud's answer to "worker 0's internal IP" (when the config does not name it)."""
        return ["gcloud", "compute", "tpus", "tpu-vm", "describe", self.tpu_name, "--zone", self.zone,
                *(["--project", self.project] if self.project else []),
                "--format=value(networkEndpoints[0].ipAddress)"]

    def host_command(self, worker: int, coordinator_host: str) -> str:
        """The shell line worker `worker` runs (in the repo checkout `workdir` on the TPU VM)."""
        argv = serve_command(f"{coordinator_host}:{self.coordinator_port}", self.shape.hosts, worker,
                             self.serve_args, self.crosspool)
        return f"cd {self.workdir} && exec {shlex.join(argv)}"

    def ssh_command(self, worker: int, coordinator_host: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.tpu_name, "--zone", self.zone,
                *(["--project", self.project] if self.project else []),
                f"--worker={worker}", f"--command={self.host_command(worker, coordinator_host)}"]


def tpu_plan(path: str | pathlib.Path) -> TpuPlan:
    """Reads a TPU launch config (deploy/tpu_v5e16.toml shows the keys)."""
    cfg = _load_toml(path)
    s = cfg.get("slice", {})
    for key in ("accelerator", "name", "zone"):
        if not isinstance(s.get(key), str) or not s[key]:
            raise LaunchError(f"{path}: [slice] needs {key} (a string)")
    shape = slice_shape(s["accelerator"])
    port = s.get("coordinator_port", DEFAULT_COORDINATOR_PORT)
    if not isinstance(port, int) or not 0 < port < 65535:
        raise LaunchError(f"{path}: [slice] coordinator_port must be a port number, got {port!r}")
    return TpuPlan(tpu_name=s["name"], zone=s["zone"], project=s.get("project") or None, shape=shape,
                   coordinator_host=s.get("coordinator_host") or None, coordinator_port=port,
                   workdir=s.get("workdir", "~/crosspool-jax"),
                   crosspool=s.get("crosspool", ".venv/bin/crosspool"),
                   serve_args=tuple(_serve_args(cfg, path)))


# In a dry-run without coordinator_host the commands read worker 0's address from $WORKER0_IP, set
# by the describe line printed first; the marker is replaced by the (locally expanded) variable.
_WORKER0_MARK = "@@WORKER0@@"


def tpu_dry_run(plan: TpuPlan) -> str:
    """The per-host commands of a TPU slice, one `gcloud ... ssh --worker=I` line per host."""
    host = plan.coordinator_host
    lines = [f"# TPU slice {plan.tpu_name}: {plan.shape.hosts} hosts x {plan.shape.chips_per_host} chips "
             f"= {plan.shape.chips} devices; process 0 (worker 0) leads and listens for clients"]
    if host is None:
        lines.append(f"WORKER0_IP=$({shlex.join(plan.describe_command())})")
        host = _WORKER0_MARK
    for w in range(plan.shape.hosts):
        lines.append(f"# host {w}: process {w} of {plan.shape.hosts}")
        lines.append(shlex.join(plan.ssh_command(w, host)).replace(_WORKER0_MARK, "'\"$WORKER0_IP\"'"))
    return "\n".join(lines)


def tpu_launch(plan: TpuPlan) -> int:
    """Starts every host's command (one gcloud ssh each, in parallel) and waits for them all."""
    host = plan.coordinator_host
    if host is None:
        host = subprocess.run(plan.describe_command(), check=True, capture_output=True,
                              text=True).stdout.strip()
        if not host:
            raise LaunchError("gcloud did not report worker 0's internal IP")
    procs = [subprocess.Popen(plan.ssh_command(w, host)) for w in range(plan.shape.hosts)]
    return max(p.wait() for p in procs)


# ---- SLURM --------------------------------------------------------------------------------------


def slurm_argv(path: str | pathlib.Path, dry_run: bool) -> list[str]:
    """`sbatch` of deploy/slurm/crosspool.sbatch with the config's node and GPU counts, or (dry run)
    the script itself run by bash with `--dry-run --nodelist`, which prints the per-node commands."""
    cfg = _load_toml(path)
    c = cfg.get("cluster", {})
    nodes, gpus = c.get("nodes"), c.get("gpus_per_node")
    if not isinstance(nodes, int) or nodes < 1 or not isinstance(gpus, int) or gpus < 1:
        raise LaunchError(f"{path}: [cluster] needs nodes and gpus_per_node (integers >= 1)")
    port = c.get("coordinator_port", DEFAULT_COORDINATOR_PORT)
    env = [f"CROSSPOOL_COORDINATOR_PORT={port}", f"CROSSPOOL_BIN={c.get('crosspool', 'crosspool')}"]
    serve = _serve_args(cfg, path)
    if dry_run:
        names = c.get("dry_run_nodes") or [f"node{i}" for i in range(nodes)]
        if len(names) != nodes:
            raise LaunchError(f"{path}: dry_run_nodes names {len(names)} nodes, nodes = {nodes}")
        return ["env", *env, "bash", str(SBATCH), "--dry-run", "--nodelist", ",".join(names), "--", *serve]
    return ["env", *env, "sbatch", f"--nodes={nodes}", "--ntasks-per-node=1", f"--gpus-per-node={gpus}",
            str(SBATCH), *serve]


# ---- Kubernetes ---------------------------------------------------------------------------------


def _load_yaml_docs(path: str | pathlib.Path) -> list[dict[str, Any]]:
    import yaml

    try:
        with open(path) as f:
            return [d for d in yaml.safe_load_all(f) if d]
    except (OSError, yaml.YAMLError) as e:
        raise LaunchError(f"{path}: {e}") from None


def _expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion of a container argument (unknown names stay as written)."""
    out = arg
    for k, v in env.items():
        out = out.replace(f"$({k})", v)
    return out


def k8s_pod_commands(path: str | pathlib.Path) -> list[tuple[str, list[str]]]:
    """(pod name, argv) of every pod of the manifest's indexed Job, with `$(VAR)` references to the
    completion index (env from the pod annotation or JOB_COMPLETION_INDEX) and to literal env
    values expanded, as the kubelet does."""
    docs = _load_yaml_docs(path)
    jobs = [d for d in docs if d.get("kind") == "Job"]
    if len(jobs) != 1:
        raise LaunchError(f"{path}: expected one Job, found {len(jobs)}")
    job = jobs[0]
    spec = job["spec"]
    if spec.get("completionMode") != "Indexed":
        raise LaunchError(f"{path}: the Job must be completionMode: Indexed (a pod per process)")
    n = int(spec["completions"])
    if int(spec.get("parallelism", n)) != n:
        raise LaunchError(f"{path}: parallelism must equal completions: every process runs at once")
    (container,) = spec["template"]["spec"]["containers"]
    name = job["metadata"]["name"]
    pods = []
    for i in range(n):
        env = {"JOB_COMPLETION_INDEX": str(i)}
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = _expand(str(e["value"]), env)
            elif "job-completion-index" in str(e.get("valueFrom", {})):
                env[e["name"]] = str(i)
        argv = [_expand(a, env) for a in container.get("command", []) + container.get("args", [])]
        pods.append((f"{name}-{i}", argv))
    return pods


def k8s_dry_run(path: str | pathlib.Path) -> str:
    lines = []
    for pod, argv in k8s_pod_commands(path):
        lines.append(f"# pod {pod}")
        lines.append(shlex.join(argv))
    return "\n".join(lines)


# ---- CLI ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deploy.launch", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="target", required=True)
    t = sub.add_parser("tpu", help="a TPU pod slice: one gcloud ssh per host")
    t.add_argument("--config", required=True, metavar="FILE.toml")
    s = sub.add_parser("slurm", help="a GPU cluster under SLURM: sbatch deploy/slurm/crosspool.sbatch")
    s.add_argument("--config", required=True, metavar="FILE.toml")
    k = sub.add_parser("k8s", help="a GPU cluster on Kubernetes: an indexed Job + headless Service")
    k.add_argument("--manifest", default=str(ROOT / "deploy" / "k8s" / "crosspool.yaml"), metavar="FILE.yaml")
    for q in (t, s, k):
        q.add_argument("--dry-run", action="store_true", help="print the per-host commands, run nothing")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.target == "tpu":
            plan = tpu_plan(args.config)
            if args.dry_run:
                print(tpu_dry_run(plan))
                return 0
            return tpu_launch(plan)
        if args.target == "slurm":
            return subprocess.run(slurm_argv(args.config, args.dry_run)).returncode
        if args.dry_run:
            print(k8s_dry_run(args.manifest))
            return 0
        k8s_pod_commands(args.manifest)  # refuse a manifest that is not a launchable group
        return subprocess.run(["kubectl", "apply", "-f", args.manifest]).returncode
    except LaunchError as e:
        print(f"deploy.launch: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
