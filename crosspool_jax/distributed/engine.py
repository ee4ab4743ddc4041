"""The pooled engine of a multi-host group, and the leader / follower roles of `crosspool serve`.

Every process builds the same `DistributedEngine` (same settings, so the same models at the same
arena rows; each process writes only its own devices' pieces). The leader (process 0) runs the
planner, the gateways and the engine's step thread; its runner (`step.LeaderRunner`) sends each
call to the followers before issuing it. A follower never steps on its own: it replays the
leader's calls (`step.follow`) until told to stop.

When a follower dies or stops answering, the step channel reports it (`channel.LeaderChannel`):
the leader fails every live request (FINISH_ERROR, the message names the process and why), refuses
new ones (UnavailableError: gRPC UNAVAILABLE) and calls `on_group_lost` (the server turns health to
NOT_SERVING). The group does not heal: restart every process (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from typing import Any

import jax

from crosspool_jax.distributed.step import GroupLostError, LeaderRunner, follow
from crosspool_jax.engine import EngineConfig, PooledEngine
from crosspool_jax.engine_api import FINISH_ERROR, Request, RequestHandle
from crosspool_jax.errors import CrossPoolError, InvalidRequestError

# a sleep copies a model's arena rows to this host and a wake writes them back: every process of a
# group would have to do the same at the same step (not built)
_NO_SLEEP = "sleeping models (sleep, wake, idle_sleep_s) are not supported in a multi-host group"


class GroupMismatchError(CrossPoolError):
    """The processes of a group were not started alike (devices, settings or models)."""


def process_major(devices: Sequence[jax.Device]) -> list[jax.Device]:
    """Devices ordered by process, then id: a "KV+W" split then puts the KV pool on the first
    processes' devices and the weights pool on the last ones' (on TPU pods JAX's global order need
    not be by host)."""
    return sorted(devices, key=lambda d: (d.process_index, d.id))


class DistributedEngine(PooledEngine):
    """`PooledEngine` in mode crosspool over every process's devices (module docstring). `channel`:
    the leader's `LeaderChannel` (None in a follower, or a group of one). Steps run lowered (one
    program per lane group: the host-scheduled strategy copies between meshes, which would cross
    hosts). `warm_programs`: step programs each lane compiles in the background at load (None:
    the runner's default, 4 on CPU, 8 on GPU; the same on every process)."""

    runner_class = LeaderRunner

    def __init__(self, mode: str = "crosspool", pools: str | None = None, max_live_requests: int = 64,
                 config: EngineConfig | None = None, devices: list[jax.Device] | None = None, *,
                 channel: Any = None, warm_programs: int | None = None):
        if mode != "crosspool":
            raise InvalidRequestError(f"a multi-host group runs mode crosspool, not {mode}")
        cfg = dataclasses.replace(config or EngineConfig(), execution="lowered")
        if getattr(cfg, "idle_sleep_s", None) is not None:
            raise InvalidRequestError(_NO_SLEEP)
        super().__init__(mode, pools, max_live_requests, cfg, process_major(devices or jax.devices()))
        self.channel = channel
        self.lost_reason: str | None = None
        # called once, from the channel's watcher thread, when the group loses a process
        self.on_group_lost: Callable[[str], None] | None = None
        if warm_programs is not None:  # background compiles per lane at load (GroupRunner's rule)
            self.runner.warm_programs = max(0, warm_programs)
        self.runner.attach(channel, on_lost=self._group_failed)
        if channel is not None:
            channel.on_lost = self._group_lost
            if channel.lost is not None:  # lost while the engine was being built
                self._group_lost(*channel.lost)

    @property
    def runner(self) -> LeaderRunner:
        """The one group's runner (its store holds the arena over every process's devices)."""
        return self.groups[0]  # type: ignore[return-value]

    def describe(self) -> str:
        n = jax.process_count()
        return f"{super().describe()}; {n} processes (this one: {jax.process_index()})"

    def _group_lost(self, process_id: int, reason: str) -> None:
        """The step channel lost follower `process_id`."""
        self._fail_group(f"the multi-host group lost a process ({reason}); restart every process of "
                         "the group")

    def _group_failed(self, reason: str) -> None:
        """A step failed in the device runtime with no process reported lost."""
        self._fail_group(f"the multi-host group cannot step: {reason}; restart every process of the group")

    def _fail_group(self, msg: str) -> None:
        """Once: fails every live request with `msg`, refuses new ones, tells `on_group_lost`."""
        with self._lock:
            if self.lost_reason is not None:
                return
            self.lost_reason = msg
        self.runner.mark_lost(msg)
        with self._lock:
            live = list(self._live.values())
        for lv in live:
            self._finish(lv, FINISH_ERROR, error=msg)
        if self.on_group_lost is not None:
            self.on_group_lost(msg)

    def freeze_models(self) -> None:
        """From now on models can be neither added nor removed: every process placed the same
        models at start-up, and a change on the leader alone would leave the followers' arenas
        different (the server calls this once the models are loaded)."""
        self._frozen = True

    def check_group(self) -> None:
        """Sends the followers this process's `group_fingerprint`; one that differs reports its
        error over the channel, and the group is lost (its requests fail, health NOT_SERVING)."""
        if self.channel is not None:
            self.channel.send({"op": "check", "fingerprint": group_fingerprint(self)})

    def _check_models_open(self) -> None:
        if getattr(self, "_frozen", False):
            raise InvalidRequestError("a multi-host group loads its models at start-up (the same --model "
                                      "flags on every process); restart the group to change them")

    def add_model(self, *args: Any, **kw: Any) -> Any:
        self._check_models_open()
        return super().add_model(*args, **kw)

    def load_model(self, name: str, path: str, on_disk: bool = False) -> Any:
        self._check_models_open()
        if on_disk:  # a model on disk is loaded by a wake: no wake in a group
            raise InvalidRequestError(_NO_SLEEP + " (nor models registered on disk: load_on_request)")
        return super().load_model(name, path)

    def add_random_model(self, *args: Any, **kw: Any) -> Any:
        self._check_models_open()
        return super().add_random_model(*args, **kw)

    def unload_model(self, name: str) -> int:
        self._check_models_open()
        return super().unload_model(name)

    def sleep(self, name: str, to_disk: bool = False) -> None:
        raise InvalidRequestError(_NO_SLEEP)

    def wake(self, name: str) -> None:
        raise InvalidRequestError(_NO_SLEEP)

    def _sleep_now(self, name: str) -> bool:
        """No model sleeps in a group: a model that does not fit is refused (CapacityError), not
        placed by putting another to sleep."""
        return False

    def submit(self, request: Request) -> RequestHandle:
        if self.lost_reason is not None:
            raise GroupLostError(self.lost_reason)
        return super().submit(request)

    def shutdown(self, timeout: float | None = None) -> None:
        super().shutdown(timeout)
        if self.channel is not None:
            self.channel.close(stop_followers=True)


def group_fingerprint(engine: DistributedEngine) -> str:
    """What every process of a group must agree on, as one string: the pools' devices, the engine
    settings that shape programs, and each placed model's config, weight dtypes and arena rows
    (not the weights' values: two checkpoints of one architecture look the same here)."""
    runner = engine.runner
    store = runner.store
    models = {name: {"config": hashlib.sha256(repr(ma.cls).encode()).hexdigest()[:16],
                     "base": {str(role): int(row) for role, row in sorted(ma.base.items())}}
              for name, ma in sorted(store.models.items())}
    doc = {"pools": PooledEngine.describe(engine), "layout": repr(store.layout),
           "config": repr(engine.config), "models": models}
    return json.dumps(doc, sort_keys=True)


def check_fingerprint(mine: str, leaders: str) -> None:
    """Raises GroupMismatchError naming the first difference between this process's fingerprint
    and the leader's."""
    if mine == leaders:
        return
    a, b = json.loads(mine), json.loads(leaders)
    diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    detail = diff[0]
    if detail == "models":
        am, bm = a.get("models", {}), b.get("models", {})
        names = sorted(n for n in set(am) | set(bm) if am.get(n) != bm.get(n))
        detail = f"models ({', '.join(names)}): here {sorted(am)}, on the leader {sorted(bm)}"
    raise GroupMismatchError(f"this process and the leader were started differently: {detail} differ "
                             "(give every process the same flags and models)")


def run_follower(channel: Any, engine: DistributedEngine, log: Callable[[str], None]) -> int:
    """A follower's life after its engine is built: replays the leader's calls until the leader
    says stop (exit status 0) or goes away (1); a failed replay is reported to the leader (which
    then fails its requests) and re-raised."""
    from crosspool_jax.distributed.channel import ChannelError

    try:
        mine = group_fingerprint(engine)
        stats = follow(channel, engine.runner, check=lambda leaders: check_fingerprint(mine, leaders))
    except ChannelError as e:
        log(f"follower: {e}; stopping")
        return 1
    except Exception as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        with contextlib.suppress(OSError):
            channel.send({"op": "error", "message": f"{type(e).__name__}: {msg}"})
        raise
    r = engine.runner
    log(f"follower: the leader stopped the group after {stats.calls} calls ({stats.prepared} programs "
        f"queued ahead at its request; {r.background_built} ready when their call came, "
        f"{r.programs_built} still compiling or not queued, {r.blocked_compile_seconds:.1f} s waited "
        "for those)")
    return 0
