"""Joining a multi-process JAX group (`jax.distributed.initialize`) before any other JAX use.

`crosspool serve --coordinator HOST:PORT --num-processes N --process-id I` (or JAX's own
environment: JAX_COORDINATOR_ADDRESS, JAX_COORDINATOR_PORT, JAX_LOCAL_DEVICE_IDS, and the cluster
detection JAX does on Cloud TPU, SLURM, Open MPI and Kubernetes when `--coordinator auto`) makes
one process of a group whose global device list spans every process; process 0 leads.
"""

from __future__ import annotations

import dataclasses
import os

from crosspool_jax.errors import CrossPoolError

# Seconds without a heartbeat after which JAX's coordination service declares a process dead. With
# recoverability on (below) that no longer aborts the survivors; the step channel
# (crosspool_jax/distributed/channel.py) notices a lost follower much sooner.
JAX_HEARTBEAT_S = 30


class ClusterError(CrossPoolError, ValueError):
    """Flags or environment that do not describe a process group."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """One process's place in the group. `coordinator`: HOST:PORT of jax.distributed's
    coordinator (process 0's address), or None for JAX's cluster detection ("auto")."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None
    step_port: int | None = None  # the leader's step channel (default: the coordinator's port + 1)

    @property
    def is_leader(self) -> bool:
        return self.process_id == 0

    def step_address(self) -> tuple[str, int]:
        """(host, port) of the leader's step channel."""
        if self.coordinator is None:
            raise ClusterError("the step channel needs the coordinator's address (--coordinator HOST:PORT)")
        host, _, port = self.coordinator.rpartition(":")
        return host, self.step_port or int(port) + 1


def cluster_spec(coordinator: str | None, num_processes: int | None, process_id: int | None,
                 step_port: int | None = None) -> ClusterSpec | None:
    """The group the flags (else JAX_COORDINATOR_ADDRESS) describe; None for a single process (no
    coordinator and no process count above 1). `coordinator` "auto": JAX detects the cluster
    (Cloud TPU, SLURM, Open MPI, Kubernetes) and fills in what is not given."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if coordinator is None and (num_processes or 1) <= 1:
        if process_id not in (None, 0):
            raise ClusterError("--process-id needs --coordinator and --num-processes")
        return None
    if coordinator == "auto":
        return ClusterSpec(None, num_processes, process_id, step_port)
    if coordinator is None:
        raise ClusterError("--num-processes > 1 needs --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
    host, sep, port = coordinator.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ClusterError(f"--coordinator must be HOST:PORT or auto, got {coordinator!r}")
    # a count or id not given is left to JAX's cluster detection (SLURM, Open MPI, ...), which
    # refuses in `initialize` when it finds none
    if num_processes is not None and num_processes < 1:
        raise ClusterError(f"--num-processes must be >= 1, got {num_processes}")
    if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
        raise ClusterError(f"--process-id {process_id} must be in [0, --num-processes {num_processes})")
    return ClusterSpec(coordinator, num_processes, process_id, step_port)


def initialize(spec: ClusterSpec, cpu_devices: int = 0, heartbeat_s: int = JAX_HEARTBEAT_S) -> ClusterSpec:
    """Joins the group; call before anything initializes a JAX backend. On CPU, cross-process
    collectives go through gloo and each process gets `cpu_devices` virtual devices (when > 1).
    Recoverability is turned on so a follower's death does not abort the leader (JAX's default:
    the coordination service terminates every process). Returns the spec with the process id and
    count JAX settled on (cluster detection fills them in for "auto")."""
    import jax
    from jax._src import distributed as jax_distributed
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise ClusterError("jax.distributed.initialize must run before any JAX computation")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; GPUs/TPUs ignore it
    jax.config.update("jax_enable_recoverability", True)
    if cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    try:
        jax.distributed.initialize(spec.coordinator, spec.num_processes, spec.process_id,
                                   heartbeat_timeout_seconds=heartbeat_s)
    except ValueError as e:  # JAX's cluster detection found no count / id
        raise ClusterError(f"jax.distributed.initialize: {' '.join(str(e).split())}") from None
    coordinator = spec.coordinator or jax_distributed.global_state.coordinator_address
    return dataclasses.replace(spec, coordinator=coordinator, num_processes=jax.process_count(),
                               process_id=jax.process_index())
