"""The leader's step, sent to the followers, and the followers' replay of it (docs/deploy.md).

Every process of the group holds the same arena (a global array over the pools' mesh, each device
its shard) and the same models (each process writes its own devices' pieces). A step's device work
is: copy the lanes' host inputs to the devices, feed tokens sampled by earlier calls (still on the
device) into the token rows, call each lane group's compiled program on the arena, and replicate
each lane's sampled tokens to every device (so the leader reads them from its own devices). In a
multi-controller group every process must issue exactly that sequence: `LeaderRunner._dispatch`
sends it (`step_message`) to the followers, then issues it; `follow` issues each message it
receives. Both go through `device_step`, so the sequences are identical by construction.

A program is named on the wire by its `StepSpec` with each lane's model class replaced by the name
of a placed model of that class (both sides place the same models under the same names); a fed
token source by (call number, lane) of the call that sampled it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from crosspool_jax.errors import CrossPoolError, UnavailableError
from crosspool_jax.execution import compile_queue
from crosspool_jax.execution.pool_runner import GroupRunner, _feed_tokens
from crosspool_jax.execution.pooled_step import LaneShape, StepSpec
from crosspool_jax.execution.step_programs import _pow2

KEEP_CALLS = 64  # calls whose outputs a fed token may still come from (far more than are in flight)
POLL_S = 0.0005  # the leader's wait for a call's tokens re-checks the group's health this often
# A collective whose peer died fails in the device runtime (gloo: "connection reset") at about the
# moment the step channel sees the peer go: the runtime's error waits this long for the channel's
# report, which names the process.
LOSS_GRACE_S = 2.0


class GroupLostError(UnavailableError, RuntimeError):
    """A process of the multi-host group died or stopped answering; the group cannot step."""


Ref = tuple[int, int]  # (call number, lane) of a call's output
Feed = tuple[int, Ref, int]  # (flat token row of the lane's inputs, source output, flat index in it)


# ---- specs on the wire --------------------------------------------------------------------------


def spec_to_wire(spec: StepSpec, store: Any) -> dict[str, Any]:
    """`spec` as JSON-able data; each lane's class named by a model of that class in `store`."""
    lanes = []
    for ln in spec.lanes:
        model = next((n for n, ma in store.models.items() if ma.cls == ln.cls), None)
        if model is None:
            raise CrossPoolError("a step program's model class has no placed model")
        fields = {f.name: getattr(ln, f.name) for f in dataclasses.fields(ln) if f.name != "cls"}
        lanes.append({"model": model, **fields})
    rest = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "lanes"}
    return {"lanes": lanes, **rest}


def spec_from_wire(data: dict[str, Any], store: Any) -> StepSpec:
    """Inverse of `spec_to_wire` against this process's `store` (same models, same names)."""
    lanes = []
    for ln in data["lanes"]:
        ln = dict(ln)
        name = ln.pop("model")
        if name not in store.models:
            raise CrossPoolError(f"the leader runs model {name!r}, which this process has not placed "
                                 "(give every process the same flags and models)")
        cls = store.models[name].cls
        lanes.append(LaneShape(cls=cls, **ln))
    rest = {k: v for k, v in data.items() if k != "lanes"}
    return StepSpec(lanes=tuple(lanes), **rest)


# ---- the device sequence both sides issue -------------------------------------------------------


def _replicator(store: Any) -> Callable[[jax.Array], jax.Array]:
    """Identity with a replicated output sharding: every device gets the whole array (a gather)."""
    return jax.jit(lambda x: x, out_shardings=NamedSharding(store.mesh, P()))


def _feeder(store: Any) -> Callable:
    return jax.jit(_feed_tokens, out_shardings=store.sharding, donate_argnums=(0,))


Inputs = list[dict[str, np.ndarray]]  # per lane: each input's host array [N, ...]
Programs = list[tuple[list[int], Callable]]  # per lane group: its lanes, its compiled program


def _to_devices(x: np.ndarray, sharding: Any) -> jax.Array:
    """`x` as a global array of `sharding`, built from this process's shards only. (`device_put`
    of a host array onto devices of several processes first checks, with a cross-process
    all-gather, that every process passed the same value: a collective per input per step, and
    one that never returns once a peer is gone.)"""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def device_step(store: Any, programs: Programs, host_inputs: Inputs, feeds: list[list[Feed]],
                source: Callable[[Ref], jax.Array], feeder: Callable, replicate: Callable
                ) -> list[jax.Array]:
    """Issues one step's device work (module docstring) and returns each lane's sampled tokens
    ([steps, N * slots] int32), replicated on every device. `host_inputs`: per lane, each key's
    [N, ...] array; `feeds`: per lane, rows whose token is read from an earlier call's output
    (`source(ref)`), grouped by source in order of first appearance."""
    dev_inputs = [{k: _to_devices(v.reshape(-1, *v.shape[2:]), store.sharding) for k, v in arr.items()}
                  for arr in host_inputs]
    for inp, feed in zip(dev_inputs, feeds, strict=True):
        by_src: dict[Ref, tuple[list[int], list[int]]] = {}
        for row, ref, idx in feed:
            rows, idxs = by_src.setdefault(tuple(ref), ([], []))
            rows.append(row)
            idxs.append(idx)
        for ref, (rows, idx) in by_src.items():
            m = _pow2(len(rows), 8)  # padded: out-of-range rows are dropped
            rows_a = np.full(m, inp["tokens"].shape[0], np.int32)
            rows_a[: len(rows)] = rows
            idx_a = np.zeros(m, np.int32)
            idx_a[: len(idx)] = idx
            inp["tokens"] = feeder(inp["tokens"], rows_a, source(ref), idx_a)
    outs: list[Any] = [None] * len(host_inputs)
    for idxs, prog in programs:
        store.arena, group_outs = prog(store.arena, tuple(dev_inputs[i] for i in idxs))
        for i, o in zip(idxs, group_outs, strict=True):
            outs[i] = o
    return [replicate(o) for o in outs]


def step_message(seq: int, specs: list[tuple[list[int], dict[str, Any]]], host_inputs: Inputs,
                 feeds: list[list[Feed]]) -> dict[str, Any]:
    """The wire form of call `seq`: per lane group (its lanes, its spec), the inputs and feeds."""
    return {"op": "step", "seq": seq, "programs": [[idxs, spec] for idxs, spec in specs],
            "inputs": host_inputs, "feeds": [[[row, list(ref), idx] for row, ref, idx in f] for f in feeds]}


# ---- the leader ---------------------------------------------------------------------------------


class LeaderRunner(GroupRunner):
    """A GroupRunner whose device work spans the processes of a group: each call is sent to the
    followers (`attach` gives the channel) before it is issued here, and its tokens are read from
    this process's devices (replicated outputs) while the group's health is watched, so a lost
    follower raises GroupLostError instead of waiting for ever."""

    channel: Any = None
    lost: threading.Event
    lost_reason: str = ""

    def attach(self, channel: Any, on_lost: Callable[[str], None] | None = None) -> None:
        """Sends every later call over `channel` (a LeaderChannel; None: a group of one).
        `on_lost(reason)`: called when a step fails in the device runtime and the channel has not
        reported a loss (the engine then fails its requests as for a lost process)."""
        self.channel = channel
        self.on_lost = on_lost
        self.lost = threading.Event()
        self._seq = 0
        self._refs: dict[int, tuple[Ref, jax.Array]] = {}  # id(output) -> (its ref, the output)
        self._specs: dict[int, StepSpec] = {}  # id(program) -> its spec (this call's programs)
        self._replicate = _replicator(self.store)
        self._feeder = _feeder(self.store)

    def mark_lost(self, reason: str) -> None:
        """The group lost a process: every later wait or dispatch raises GroupLostError."""
        self.lost_reason = reason
        self.lost.set()

    def _check(self) -> None:
        if self.lost.is_set():
            raise GroupLostError(self.lost_reason)

    def _device_failed(self, e: Exception) -> GroupLostError:
        """The error a step that failed in the device runtime ends in: the channel's report of a
        lost process when it comes within LOSS_GRACE_S, else the runtime's own error, reported as
        a loss (the processes may have diverged: the group cannot step on)."""
        if not self.lost.wait(LOSS_GRACE_S):
            msg = " ".join(str(e).split()) or type(e).__name__
            reason = f"a step failed in the device runtime ({type(e).__name__}: {msg})"
            if self.on_lost is not None:
                self.on_lost(reason)
            if not self.lost.is_set():
                self.mark_lost(reason)
        return GroupLostError(self.lost_reason)

    def _prepare_followers(self, spec: StepSpec, priority: int) -> None:
        """Asks the followers to queue `spec` for their background compilers."""
        if self.channel is not None and not self.lost.is_set():
            with contextlib.suppress(CrossPoolError):  # a lost follower: the channel reported it
                self.channel.send({"op": "prepare", "spec": spec_to_wire(spec, self.store),
                                   "priority": priority})

    def _compile_in_background(self, spec: StepSpec, priority: int = compile_queue.WARM) -> None:
        """Queues `spec` here and on the followers (warm-ups, the next page bucket, a fallback's
        exact program), so a step seldom waits for a follower's compile."""
        super()._compile_in_background(spec, priority)
        self._prepare_followers(spec, priority)

    def _compile(self, spec: StepSpec) -> Callable:
        """A compile on the serving path: the followers start theirs first, so the two run side
        by side instead of one after the other (the follower's would start when the call came)."""
        self._prepare_followers(spec, compile_queue.URGENT)
        return super()._compile(spec)

    def precompile(self, specs: Sequence[StepSpec], threads: int = 4,
                   log: Callable[[str], None] | None = None) -> int:
        """`GroupRunner.precompile`, with the same programs queued on the followers first."""
        for spec in specs:
            self._prepare_followers(spec, compile_queue.WARM)
        return super().precompile(specs, threads, log)

    def _program_for(self, want: StepSpec) -> tuple[StepSpec, Callable]:
        spec, prog = super()._program_for(want)
        self._specs[id(prog)] = spec
        return spec, prog

    def _dispatch(self, programs: Programs, host_inputs: Inputs, feeds: list[list[tuple[int, Any, int]]]
                  ) -> tuple[list[Any], float]:
        self._check()
        store = self.store
        wire_feeds: list[list[Feed]] = []
        for feed in feeds:
            lane = []
            for row, src, idx in feed:
                got = self._refs.get(id(src))
                if got is None or got[1] is not src:
                    raise CrossPoolError("a fed token's source call is no longer tracked")
                lane.append((row, got[0], idx))
            wire_feeds.append(lane)
        specs = [(idxs, spec_to_wire(self._specs[id(prog)], store)) for idxs, prog in programs]
        self._specs.clear()
        seq = self._seq
        self._seq += 1
        if self.channel is not None:
            self.channel.send(step_message(seq, specs, host_inputs, wire_feeds))
        by_ref = {ref: arr for ref, arr in self._refs.values()}
        dispatched = self._now()
        try:
            outs = device_step(store, programs, host_inputs, wire_feeds, lambda r: by_ref[tuple(r)],
                               self._feeder, self._replicate)
        except CrossPoolError:
            raise
        except Exception as e:  # the device runtime (a collective whose peer is gone)
            raise self._device_failed(e) from e
        for lane, o in enumerate(outs):
            self._refs[id(o)] = ((seq, lane), o)
        self._refs = {k: v for k, v in self._refs.items() if v[0][0] > seq - KEEP_CALLS}
        return outs, dispatched

    def _read(self, call: Any) -> list[np.ndarray]:
        """The call's tokens per lane, from this process's copy; waits while the group is healthy."""
        try:
            while not all(o.is_ready() for o in call.outs):
                self._check()
                self.lost.wait(POLL_S)
            self._check()
            return [np.asarray(o.addressable_shards[0].data) for o in call.outs]
        except CrossPoolError:
            raise
        except Exception as e:  # the device runtime (a collective whose peer is gone)
            raise self._device_failed(e) from e


# ---- a follower ---------------------------------------------------------------------------------


@dataclasses.dataclass
class FollowStats:
    """What a follower did: calls replayed, programs the leader asked it to compile ahead."""

    calls: int = 0
    prepared: int = 0


def follow(channel: Any, runner: GroupRunner, on_step: Callable[[int], None] | None = None,
           check: Callable[[str], None] | None = None) -> FollowStats:
    """Replays the leader's calls on `runner`'s arena until the leader says stop (returns what it
    did) or goes away (ChannelError). A "check" message is passed to `check` (which raises when
    this process differs from the leader); "prepare" messages queue a program for the runner's
    background compiler; a program a call needs that is not compiled yet is waited for (its
    background compile running) or compiled on the spot."""
    store = runner.store
    feeder, replicate = _feeder(store), _replicator(store)
    outs: dict[Ref, jax.Array] = {}
    stats = FollowStats()
    while True:
        msg = channel.recv()
        if msg["op"] == "stop":
            return stats
        if msg["op"] == "check":  # the leader's fingerprint of the group (engine.group_fingerprint)
            if check is not None:
                check(msg["fingerprint"])
            continue
        if msg["op"] == "prepare":
            with runner._state_lock:
                runner._compile_in_background(spec_from_wire(msg["spec"], store), int(msg["priority"]))
            stats.prepared += 1
            continue
        if msg["op"] != "step":
            continue
        seq = int(msg["seq"])
        programs = []
        with runner._state_lock:
            for idxs, wire in msg["programs"]:
                spec = spec_from_wire(wire, store)
                # not compiled yet: waits for its background compile if one is running, else compiles
                prog = runner._lookup(spec) or runner._compile(spec)
                programs.append((list(idxs), prog))
            feeds = [[(int(row), (int(ref[0]), int(ref[1])), int(idx)) for row, ref, idx in f]
                     for f in msg["feeds"]]
            got = device_step(store, programs, msg["inputs"], feeds, lambda r: outs[tuple(r)], feeder,
                              replicate)
        for lane, o in enumerate(got):
            outs[(seq, lane)] = o
        for ref in [r for r in outs if r[0] <= seq - KEEP_CALLS]:
            del outs[ref]
        stats.calls += 1
        if on_step is not None:
            on_step(seq)
