"""The host-scheduled pooled step: the engine's second execution strategy (issue 5, item 8).

`HostScheduledStep(spec, store, platform)` has the contract of `pooled_step.build_step`'s program,
``step(arena, inputs) -> (arena, outputs)`` for the same `StepSpec`, arena and inputs, so the
engine's runner (`crosspool_jax/execution/pool_runner.py`) can run either. No program spans both pools here:

    per decode step, per lane (one model class' slots; the lanes of a step are its micro-batches):
      KV mesh       begin: embed the lane's tokens; rows' models / liveness, replicated
      per layer l:
        KV mesh     residual += FFN output of layer l - 1 (this device's rows)
                    norms, projections, rotary, kv_append (in place, arena donated), paged
                    attention (+ split-KV combine over the KV devices), o-proj, residual, norm
                    -> every KV device's FFN input rows, all-gathered (replicated)
        device_put  [n_kv * T, D] KV mesh -> weights mesh (replicated to replicated: device to
                    device, no host copy)
        weights     router, local experts as a grouped matmul over the arena, shared / dense FFN
        mesh        tensor-parallel; psum -> [n_kv * T, D] f32, replicated
        device_put  weights mesh -> KV mesh
      KV mesh       end: residual += last FFN output, final norm, LM head, on-device sampling,
                    stop checks, the next step's carry

Every call and transfer is dispatched asynchronously; the host waits once per call of the step
(K decode tokens), when it fetches the sampled tokens. One attention program and one FFN program
per (lane shape, sliding window / FFN kind) serve every layer: the layer is a traced index (the
weights' arena rows and the page-table column are computed from it), so a lane shape compiles a
handful of small programs instead of one per layer. The lanes' calls are issued layer by layer,
lane after lane, so with two or more lanes (ping-pong micro-batches, or several model classes) the
KV devices run one lane's attention while the weights devices run another lane's experts.

Group size: one layer per call on each pool. Layer l + 1's attention needs layer l's FFN output
from the other pool, so a call on one pool can never hold two layers of one lane; grouping g
layers means a diagonal over g micro-batches (a standalone pipeline that did so was removed
unmeasured on GPUs, which it needed two of); here the step's lanes overlap.

The arena is one global array over both pools' devices; the step views it as a KV-mesh array and
a weights-mesh array built from the same per-device buffers (no copy), donates the KV view to each
attention call (KV appends stay in place) and reassembles the global array at the end.
Only for crosspool topologies (disjoint KV and weights devices) in one process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from crosspool_jax.execution.pooled_step import (
    Lane,
    LaneState,
    StepSpec,
    lane_specs,
    model_geometry,
    next_carry,
)
from crosspool_jax.memory.arena import ArenaStore, shard_map
from crosspool_jax.memory.topology import POOL_AXIS
from crosspool_jax.models.config import FFNKind

REPLICATED = P()
EXECUTIONS = ("lowered", "host", "auto")


def _sub_array(x: jax.Array, devices: Sequence[jax.Device], sharding: NamedSharding) -> jax.Array:
    """The rows of `x` (sharded over the global pool axis, equal rows per device) that live on
    `devices`, as an array of `sharding` over those devices, built from the same buffers."""
    by_dev = {s.device: s.data for s in x.addressable_shards}
    per = x.shape[0] // len(by_dev)
    return jax.make_array_from_single_device_arrays((per * len(devices), *x.shape[1:]), sharding,
                                                    [by_dev[d] for d in devices])


class HostScheduledStep:
    """`spec`'s step driven from the host over the KV mesh and the weights mesh (module docstring).

    Call as ``step(arena, inputs) -> (arena, outputs)``: arena the store's global arena (donated:
    its KV devices' buffers are updated in place and the returned array replaces it), inputs one
    dict per lane as `pooled_step.build_step` takes them, outputs one [K, N * B] int32 array per
    lane (device-major; -1 where no token, and on every weights device's columns).
    `calls_per_step` / `transfers_per_step`: the host's dispatches of the last call, per step.
    """

    def __init__(self, spec: StepSpec, store: ArenaStore, platform: str):
        if store.colocated or store.weights_index_base != store.num_kv or store.num_kv >= store.num_devices:
            raise ValueError("the host-scheduled step needs a crosspool topology "
                             "(disjoint KV and weights devices)")
        self.spec = spec
        self.store = store
        devs = list(store.mesh.devices.reshape(-1))
        self.n, self.n_kv = len(devs), store.num_kv
        self.kv_devices, self.w_devices = devs[: self.n_kv], devs[self.n_kv:]
        self.kv_mesh = Mesh(np.array(self.kv_devices), (POOL_AXIS,))
        self.w_mesh = Mesh(np.array(self.w_devices), (POOL_AXIS,))
        self.kv_split = NamedSharding(self.kv_mesh, P(POOL_AXIS))
        self.w_split = NamedSharding(self.w_mesh, P(POOL_AXIS))
        self.kv_repl = NamedSharding(self.kv_mesh, REPLICATED)
        self.w_repl = NamedSharding(self.w_mesh, REPLICATED)
        self.mm_backend = spec.matmul_backend or ("gpu" if platform == "gpu" else "reference")
        n_w = self.n - self.n_kv
        self.kv_lanes = [Lane(sh, model_geometry(sh.cls.config, store.layout, platform), spec,
                               self.n_kv, self.n_kv, 0) for sh in spec.lanes]
        self.w_lanes = [Lane(sh, model_geometry(sh.cls.config, store.layout, platform), spec,
                              n_w, self.n_kv, 0) for sh in spec.lanes]
        self.ksteps = spec.steps if spec.decode else 1
        self._programs: dict[tuple[Any, ...], Callable] = {}
        self._index_kv: dict[int, jax.Array] = {}
        self._index_w: dict[int, jax.Array] = {}
        self.calls_per_step = 0.0
        self.transfers_per_step = 0.0

    # -- programs ------------------------------------------------------------------------------
    def _program(self, key: tuple[Any, ...], build: Callable[[], Callable]) -> Callable:
        prog = self._programs.get(key)
        if prog is None:
            prog = self._programs[key] = build()
        return prog

    def _lane_in_specs(self, i: int) -> dict[str, P]:
        return lane_specs(self.spec.lanes[i], self.spec.decode)

    def _begin(self, i: int) -> Callable:
        """(arena, inp, toks, lens, dones) -> (x, row_ok, tail_len, f_grp, f_ok): the lane's
        embedded tokens and which rows are live; f_grp / f_ok [n_kv * T] replicated."""
        ln, n_kv = self.kv_lanes[i], self.n_kv
        t = ln.shape.tokens

        def body(arena, inp, toks, lens, dones):
            row_ok, tail_len = ln.live_rows(inp, lens, dones, jnp.bool_(True))
            rd = ln.reader(arena, inp, self.mm_backend)
            x = rd.embed(jnp.where(row_ok, toks, 0), inp["tok_grp"])
            f_grp = lax.all_gather(inp["tok_grp"], POOL_AXIS, tiled=True)[: n_kv * t]
            f_ok = lax.all_gather(row_ok, POOL_AXIS, tiled=True)[: n_kv * t]
            return x, row_ok, tail_len, f_grp, f_ok

        sp = P(POOL_AXIS)
        f = shard_map(body, self.kv_mesh, in_specs=(sp, self._lane_in_specs(i), sp, sp, sp),
                      out_specs=(sp, sp, sp, REPLICATED, REPLICATED))
        return jax.jit(f)

    def _attention(self, i: int, window: int | None) -> Callable:
        """(arena, x, ffn_prev, layer, positions, row_ok, tail_len, inp) -> (arena, x, f_rows):
        one layer's attention side for the lane; ffn_prev [n_kv * T, D] f32 replicated (the
        previous layer's FFN output; zeros before layer 0), f_rows [n_kv * T, D] replicated.
        donates: the arena (the KV view)."""
        ln = self.kv_lanes[i]
        t = ln.shape.tokens
        n_kv = self.n_kv

        def body(arena, x, ffn_prev, layer, positions, row_ok, tail_len, inp):
            dev = lax.axis_index(POOL_AXIS)
            yes = jnp.bool_(True)
            x = x + lax.dynamic_slice_in_dim(ffn_prev, dev * t, t, axis=0).astype(x.dtype)
            st = LaneState(x, positions, row_ok, tail_len, inp)
            ctx = ln.attention_pre(ln.reader(arena, inp, self.mm_backend), st, layer, yes)
            # every read of the arena's old version happens before the KV write (in place)
            arrs = {k: v for k, v in ctx.items() if isinstance(v, jax.Array)}
            arena, arrs, st.x = lax.optimization_barrier((arena, arrs, st.x))
            ctx = {**ctx, **arrs}
            arena = ln.kv_write(arena, ctx)
            f_in = ln.attention_post(ln.reader(arena, inp, self.mm_backend), arena, st, layer, dev, yes,
                                     ctx, window)
            f_rows = lax.all_gather(jnp.where(row_ok[:, None], f_in, 0), POOL_AXIS,
                                    tiled=True)[: n_kv * t]
            return arena, st.x, f_rows

        sp = P(POOL_AXIS)
        f = shard_map(body, self.kv_mesh,
                      in_specs=(sp, sp, REPLICATED, REPLICATED, sp, sp, sp, self._lane_in_specs(i)),
                      out_specs=(sp, sp, REPLICATED))
        return jax.jit(f, donate_argnums=(0,))

    def _ffn(self, i: int, kind: FFNKind) -> Callable:
        """(arena, f_rows, f_grp, f_ok, idx, a_base, f_base) -> [n_kv * T, D] f32 replicated: one
        layer's FFN of the lane's rows (idx: the layer's index into `kind`'s stacked tensors)."""
        ln = self.w_lanes[i]

        def body(arena, f_rows, f_grp, f_ok, idx, a_base, f_base):
            dev = lax.axis_index(POOL_AXIS)
            rd = ln.reader(arena, {"a_base": a_base, "f_base": f_base}, self.mm_backend)
            part = ln.ffn(rd, f_rows, f_grp, f_ok, kind, idx, dev, jnp.bool_(True))
            return lax.psum(part, POOL_AXIS)

        sp = P(POOL_AXIS)
        f = shard_map(body, self.w_mesh, in_specs=(sp, REPLICATED, REPLICATED, REPLICATED, REPLICATED,
                                                   sp, sp), out_specs=REPLICATED)
        return jax.jit(f)

    def _end(self, i: int) -> Callable:
        """(arena, x, ffn_last, positions, inp, toks, lens, rems, dones) -> (next token [B],
        toks, positions, lens, rems, dones): LM head, sampling, stop checks, the next carry."""
        ln, decode = self.kv_lanes[i], self.spec.decode
        t = ln.shape.tokens

        def body(arena, x, ffn_last, positions, inp, toks, lens, rems, dones):
            dev = lax.axis_index(POOL_AXIS)
            x = x + lax.dynamic_slice_in_dim(ffn_last, dev * t, t, axis=0).astype(x.dtype)
            nxt, valid, fin = ln.sample(ln.reader(arena, inp, self.mm_backend), x, positions, inp, rems,
                                        dones, jnp.bool_(True))
            if not decode:
                return nxt, toks, positions, lens, rems, dones
            return (nxt, *next_carry(nxt, valid, fin, toks, positions, lens, rems, dones))

        sp = P(POOL_AXIS)
        f = shard_map(body, self.kv_mesh,
                      in_specs=(sp, sp, REPLICATED, sp, self._lane_in_specs(i), sp, sp, sp, sp),
                      out_specs=(sp,) * 6)
        return jax.jit(f)

    def _index(self, value: int, kv: bool) -> jax.Array:
        cache = self._index_kv if kv else self._index_w
        arr = cache.get(value)
        if arr is None:
            arr = cache[value] = jax.device_put(np.int32(value), self.kv_repl if kv else self.w_repl)
        return arr

    # -- the step ------------------------------------------------------------------------------
    def __call__(self, arena: jax.Array, inputs: Sequence[dict[str, jax.Array]]
                 ) -> tuple[jax.Array, tuple[np.ndarray, ...]]:
        spec = self.spec
        kv_arena = _sub_array(arena, self.kv_devices, self.kv_split)
        w_arena = _sub_array(arena, self.w_devices, self.w_split)
        del arena  # its KV buffers are donated below; the caller gets the reassembled array
        inp_kv = [{k: _sub_array(v, self.kv_devices, self.kv_split) for k, v in d.items()} for d in inputs]
        inp_w = [(_sub_array(d["a_base"], self.w_devices, self.w_split),
                  _sub_array(d["f_base"], self.w_devices, self.w_split)) for d in inputs]
        carry = []
        for d in inp_kv:
            dones = (d["tail_len"] <= 0) if spec.decode else jnp.zeros_like(d["tail_len"], bool)
            carry.append([d["tokens"], d["positions"], d["tail_len"], d["remaining"], dones])
        zeros = [jax.device_put(np.zeros((self.n_kv * sh.tokens, sh.cls.config.hidden_size), np.float32),
                                self.kv_repl) for sh in spec.lanes]
        outs: list[list[jax.Array]] = [[] for _ in spec.lanes]
        calls = transfers = 0
        for _ in range(self.ksteps):
            state = []
            for i, d in enumerate(inp_kv):
                toks, poss, lens, rems, dones = carry[i]
                x, row_ok, tail_len, f_grp, f_ok = self._program(("begin", i), lambda i=i: self._begin(i))(
                    kv_arena, d, toks, lens, dones)
                state.append([x, row_ok, tail_len, jax.device_put(f_grp, self.w_repl),
                              jax.device_put(f_ok, self.w_repl), zeros[i]])
                calls += 1
                transfers += 2
            max_layers = max(sh.cls.config.num_layers for sh in spec.lanes)
            for layer in range(max_layers):
                for i, d in enumerate(inp_kv):
                    cfg = spec.lanes[i].cls.config
                    if layer >= cfg.num_layers:
                        continue
                    x, row_ok, tail_len, f_grp, f_ok, prev = state[i]
                    window = cfg.sliding_windows[layer] or None
                    attn = self._program(("attn", i, window), lambda i=i, w=window: self._attention(i, w))
                    kv_arena, x, f_rows = attn(kv_arena, x, prev, self._index(layer, True),
                                               carry[i][1], row_ok, tail_len, d)
                    kind = cfg.ffn_kinds[layer]
                    ffn = self._program(("ffn", i, kind), lambda i=i, k=kind: self._ffn(i, k))
                    total = ffn(w_arena, jax.device_put(f_rows, self.w_repl), f_grp, f_ok,
                                self._index(cfg.ffn_stack_index[layer], False), *inp_w[i])
                    state[i][0], state[i][5] = x, jax.device_put(total, self.kv_repl)
                    calls += 2
                    transfers += 2
            for i, d in enumerate(inp_kv):
                x, *_, prev = state[i]
                toks, poss, lens, rems, dones = carry[i]
                nxt, *carry[i] = self._program(("end", i), lambda i=i: self._end(i))(
                    kv_arena, x, prev, poss, d, toks, lens, rems, dones)
                outs[i].append(nxt)
                calls += 1
        self.calls_per_step = calls / self.ksteps
        self.transfers_per_step = transfers / self.ksteps
        kv_by = {s.device: s.data for s in kv_arena.addressable_shards}
        w_by = {s.device: s.data for s in w_arena.addressable_shards}
        per = kv_arena.shape[0] // self.n_kv
        arena = jax.make_array_from_single_device_arrays(
            (per * self.n, *kv_arena.shape[1:]), self.store.sharding,
            [kv_by[d] for d in self.kv_devices] + [w_by[d] for d in self.w_devices])
        result = []
        for sh, lane_outs in zip(spec.lanes, outs, strict=True):
            got = np.full((len(lane_outs), self.n * sh.slots), -1, np.int32)
            got[:, : self.n_kv * sh.slots] = np.stack([np.asarray(o) for o in lane_outs])
            result.append(got)
        return arena, tuple(result)


class StrategyTrial:
    """Timings of the two strategies for one lane structure (`trial_key`): the step shapes that
    differ only in their page-table width share it, so a verdict reached on one shape holds for
    the next (a longer context changes attention's work, which is the same kernel either way)."""

    def __init__(self, trials: int = 2):
        self.trials = trials
        self.seconds: dict[str, list[float]] = {"lowered": [], "host": []}
        self.choice: str | None = None

    def record(self, name: str, seconds: float) -> None:
        self.seconds[name].append(seconds)
        if self.choice is None and all(len(v) >= self.trials for v in self.seconds.values()):
            self.choice = min(self.seconds, key=lambda k: statistics.median(self.seconds[k]))


def trial_key(spec: StepSpec) -> tuple[Any, ...]:
    """What a strategy verdict depends on: the step kind and its lanes without page-table widths."""
    return (spec.decode, spec.steps, tuple((sh.cls, sh.groups, sh.slots, sh.tokens, sh.extras)
                                           for sh in spec.lanes))


class MeasuredChoice:
    """The `auto` execution strategy of one step shape while its `StrategyTrial` has no verdict:
    each call runs the strategy with fewer timed calls, timed to the end of its device work; the
    first call of each strategy on this shape is not timed (it compiles). Once the trial has a
    verdict (`choice`), every call runs the faster. Both leave the same arena and tokens."""

    def __init__(self, lowered: Callable, host: HostScheduledStep, trial: StrategyTrial):
        self.candidates: dict[str, Callable] = {"lowered": lowered, "host": host}
        self.trial = trial
        self._calls = {"lowered": 0, "host": 0}

    @property
    def choice(self) -> str | None:
        return self.trial.choice

    def __call__(self, arena: jax.Array, inputs: Sequence[dict[str, jax.Array]]) -> tuple[jax.Array, Any]:
        if self.trial.choice is not None:
            return self.candidates[self.trial.choice](arena, inputs)
        name = min(self._calls, key=lambda k: (len(self.trial.seconds[k]), self._calls[k]))
        t0 = time.perf_counter()
        arena, outs = self.candidates[name](arena, inputs)
        jax.block_until_ready((arena, outs))
        if self._calls[name]:
            self.trial.record(name, time.perf_counter() - t0)
        self._calls[name] += 1
        return arena, outs
