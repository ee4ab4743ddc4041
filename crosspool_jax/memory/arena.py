"""The unified arena: one same-shaped buffer per device whose meaning depends on the device's role.

The one-program step (crosspool_jax/execution/pooled_step.py) runs SPMD over the global mesh, so every
global array gives every device a same-shaped shard. Devices of the two pools hold different
things, so each device owns ONE arena `[num_pages, rows_per_page, R]` (pallas_kernels.page_layout)
and the roles give it meaning (docs/design.md, "The unified arena"):

    KV device:      rows [0, attn_rows)      attention-side weights of every model (replicated on
                                             each KV device)
                    pages [kv_first_page, ..) KV pages, shared by every model (the KV virtualizer
                                             hands them out; page ids are arena page ids)
    weights device: rows [0, ...)            FFN-side weights of every model: routed experts
                                             sharded expert-parallel (expert axis padded to a
                                             multiple of the weights devices), shared experts and
                                             dense FFN sharded tensor-parallel on the intermediate
                                             axis (padded), routers replicated

So a weights device holds no attention weights and no pages, and a KV device holds no FFN weights.
Kernels reach weights through row offsets (`TensorSlot.row`), like KV through page tables.

Storage of one tensor: per item (one layer of a stack), the logical array's last axis is padded to
a multiple of R and laid out row-major, so a `[K, N]` matrix is `K * N_pad / R` consecutive rows
(`pallas_kernels.arena_matmul` reads it in place). A tensor whose dtype differs from the arena's
(DeepSeek-V3's float32 router bias in a bf16 arena) is stored bit-for-bit (bitcast), everything
else is cast to the arena dtype (the pool's weights dtype).

This module is host-side: the plan (`ArenaPlan`, plain Python) and the writer (`ArenaStore`), which
places a model's tensors with one jitted, donated in-place update per tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from crosspool_jax.errors import CapacityError, CrossPoolError
from crosspool_jax.memory.topology import POOL_AXIS, PoolTopology, Role, experts_per_device
from crosspool_jax.models.config import AttentionKind, FFNKind, ModelConfig
from crosspool_jax.models.params import ModelWeights
from pallas_kernels.page_layout import PoolLayout, _np_dtype

try:  # jax >= 0.6
    from jax import shard_map as _shard_map

    def shard_map(f: Callable, mesh: Any, in_specs: Any, out_specs: Any) -> Callable:
        return _shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
except ImportError:  # pragma: no cover
    from jax.experimental.shard_map import shard_map as _old_shard_map

    def shard_map(f: Callable, mesh: Any, in_specs: Any, out_specs: Any) -> Callable:
        return _old_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


class ArenaError(CrossPoolError):
    """A model that cannot be placed in the arena, or an inconsistent arena request."""


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    """Where one (stacked) tensor lives in the arenas of the devices of `role`.

    items: stacked copies (layers; 1 for an unstacked tensor); item i starts at row
    ``row + i * item_rows``. shape: one item's logical shape ON ONE DEVICE (expert / tensor-parallel
    shards included). dtype: the logical dtype. bitcast: stored bit-for-bit in arena units.
    """

    role: Role
    row: int
    items: int
    shape: tuple[int, ...]
    dtype: str
    row_elems: int
    arena_dtype: str

    @property
    def bitcast(self) -> bool:
        return np.dtype(_np_dtype(self.dtype)) != np.dtype(_np_dtype(self.arena_dtype))

    @property
    def last_padded(self) -> int:
        """The last axis as stored (arena elements, padded to a multiple of R)."""
        last = self.shape[-1] if self.shape else 1
        if self.bitcast:
            ratio = np.dtype(_np_dtype(self.dtype)).itemsize // np.dtype(_np_dtype(self.arena_dtype)).itemsize
            last *= ratio
        return -(-last // self.row_elems) * self.row_elems

    @property
    def lead(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    @property
    def item_rows(self) -> int:
        return self.lead * self.last_padded // self.row_elems

    @property
    def rows(self) -> int:
        return self.items * self.item_rows

    def item_row(self, item: int) -> int:
        return self.row + item * self.item_rows


@dataclasses.dataclass(frozen=True)
class ModelClass:
    """What a compiled step needs to know of a model: its config and where each tensor lies
    RELATIVE to the model's base row on the devices of the tensor's role.

    A model's tensors of one role are one contiguous block of arena rows, laid out in a fixed order
    by `model_tensors`, so models with equal configs, weight dtypes and pool split have equal
    classes and differ only in their base rows. A step program is built per class and takes the
    bases as inputs: a program serves every model of its class, and one lane can run several of
    them (docs/design.md, "Lanes and model classes"). Hashable (a jit cache key)."""

    config: ModelConfig
    slots: tuple[tuple[str, TensorSlot], ...]  # (name, slot with `row` relative to the role base)
    experts_local: int  # routed experts per weights device (expert axis padded)
    shared_local: int  # shared-expert intermediate columns per weights device (0: none)
    dense_local: int  # dense-FFN intermediate columns per weights device (0: none)

    @functools.cached_property
    def _by_name(self) -> dict[str, TensorSlot]:
        return dict(self.slots)

    def slot(self, name: str) -> TensorSlot:
        return self._by_name[name]

    def has(self, name: str) -> bool:
        return name in self._by_name

    def rows(self, role: Role) -> int:
        """Rows of the model's block on a device of `role`."""
        return sum(s.rows for _, s in self.slots if s.role == role)


@dataclasses.dataclass(frozen=True)
class ModelArena:
    """A placed model: its class and its base row per role; `slots` gives absolute rows.
    Names are the F-/A-side tree paths with the layer stack removed (``attn/layers/wqkv``,
    ``ffn/moe/w_gate_up`` ...)."""

    name: str
    cls: ModelClass
    base: Mapping[Role, int]  # first row of the model's block on devices of each role

    @property
    def config(self) -> ModelConfig:
        return self.cls.config

    @property
    def experts_local(self) -> int:
        return self.cls.experts_local

    @property
    def shared_local(self) -> int:
        return self.cls.shared_local

    @property
    def dense_local(self) -> int:
        return self.cls.dense_local

    @functools.cached_property
    def slots(self) -> dict[str, TensorSlot]:
        return {n: dataclasses.replace(s, row=self.base[s.role] + s.row) for n, s in self.cls.slots}

    def slot(self, name: str) -> TensorSlot:
        return self.slots[name]

    def has(self, name: str) -> bool:
        return self.cls.has(name)

    def rows(self, role: Role) -> int:
        return self.cls.rows(role)


# ---- what a model stores where ----------------------------------------------------------------


def _pad_axis(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    if a.shape[axis] == size:
        return a
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, size - a.shape[axis])
    return np.pad(a, pad)


def _tp_gate_up(w: np.ndarray, inter: int, parts: int, j: int) -> np.ndarray:
    """[.., D, 2I] gate|up -> device j's [.., D, 2 * I_loc] (gate cols then up cols, zero-padded)."""
    loc = -(-inter // parts)
    gate = _pad_axis(w[..., :inter], -1, loc * parts)[..., j * loc:(j + 1) * loc]
    up = _pad_axis(w[..., inter:], -1, loc * parts)[..., j * loc:(j + 1) * loc]
    return np.concatenate([gate, up], axis=-1)


def _tp_down(w: np.ndarray, inter: int, parts: int, j: int) -> np.ndarray:
    """[.., I, D] -> device j's [.., I_loc, D] rows (zero-padded)."""
    loc = -(-inter // parts)
    return _pad_axis(w, -2, loc * parts)[..., j * loc:(j + 1) * loc, :]


TensorPieces = Callable[[int], np.ndarray]
"""Given the index of a device within its pool, that device's host array (all items stacked)."""


def model_tensors(cfg: ModelConfig, weights: ModelWeights, num_weights_devices: int
                  ) -> Iterator[tuple[str, Role, tuple[int, ...], int, str, TensorSlot | None,
                                      TensorPieces]]:
    """Yields (name, role, per-item shape, items, dtype, None, pieces) for every stored tensor.

    A-side: GQA q/k/v are fused into ``wqkv [D, (H + 2K) * Dh]`` (one weight read); a tied LM
    head is stored transposed as ``lm_head [D, V]``. F-side: experts, shared experts and dense FFN
    sharded as the module docstring says.
    """
    w = num_weights_devices
    a, f = weights.attn, weights.ffn  # arrays or ShapeDtypeStructs: nothing is read until a piece is

    def host(x: Any) -> np.ndarray:
        return np.asarray(x)

    def rep(name: str, role: Role, arr: Any, stacked: bool, get: Callable[[], np.ndarray] | None = None):
        shape = arr.shape[1:] if stacked else arr.shape
        items = arr.shape[0] if stacked else 1
        get = get or (lambda arr=arr: host(arr))
        return name, role, tuple(shape), items, str(np.dtype(arr.dtype)), None, (lambda j: get())

    yield rep("attn/embed", Role.KV, a["embed"], False)
    yield rep("attn/final_norm", Role.KV, a["final_norm"], False)
    if cfg.tie_word_embeddings:
        e = a["embed"]
        yield rep("attn/lm_head", Role.KV, jax.ShapeDtypeStruct(e.shape[::-1], e.dtype), False,
                  lambda e=e: np.ascontiguousarray(host(e).T))
    else:
        yield rep("attn/lm_head", Role.KV, a["lm_head"], False)
    layers = dict(a["layers"])
    if cfg.attention == AttentionKind.GQA:
        for fused, parts in (("wqkv", ("wq", "wk", "wv")), ("bqkv", ("bq", "bk", "bv"))):
            if parts[0] not in layers:
                continue
            arrs = [layers.pop(p) for p in parts]
            spec = jax.ShapeDtypeStruct((*arrs[0].shape[:-1], sum(x.shape[-1] for x in arrs)),
                                        arrs[0].dtype)
            yield rep(f"attn/layers/{fused}", Role.KV, spec, True,
                      lambda arrs=arrs: np.concatenate([host(x) for x in arrs], -1))
    for k, v in layers.items():
        yield rep(f"attn/layers/{k}", Role.KV, v, True)

    def dt(x: Any) -> str:
        return str(np.dtype(x.dtype))

    if "dense" in f:
        d = f["dense"]
        inter = d["w_down"].shape[1]
        loc = -(-inter // w)
        gu, dn = d["w_gate_up"], d["w_down"]
        yield ("ffn/dense/w_gate_up", Role.WEIGHTS, (gu.shape[1], 2 * loc), gu.shape[0], dt(gu),
               None, lambda j, gu=gu, inter=inter: _tp_gate_up(host(gu), inter, w, j))
        yield ("ffn/dense/w_down", Role.WEIGHTS, (loc, dn.shape[2]), dn.shape[0], dt(dn),
               None, lambda j, dn=dn, inter=inter: _tp_down(host(dn), inter, w, j))
    if "moe" in f:
        m = f["moe"]
        lm, num_e, dim, two_i = m["w_gate_up"].shape
        e_loc = experts_per_device(num_e, w)
        yield rep("ffn/moe/router", Role.WEIGHTS, m["router"], True)
        if "router_bias" in m:
            yield rep("ffn/moe/router_bias", Role.WEIGHTS, m["router_bias"], True)
        gu, dn = m["w_gate_up"], m["w_down"]

        def experts(arr: Any, j: int) -> np.ndarray:
            lo, hi = j * e_loc, min((j + 1) * e_loc, num_e)
            part = host(arr[:, lo:hi]) if hi > lo else np.zeros((lm, 0, *arr.shape[2:]), np.dtype(arr.dtype))
            return _pad_axis(part, 1, e_loc)

        yield ("ffn/moe/w_gate_up", Role.WEIGHTS, (e_loc, dim, two_i), lm, dt(gu), None,
               lambda j, gu=gu: experts(gu, j))
        yield ("ffn/moe/w_down", Role.WEIGHTS, (e_loc, two_i // 2, dim), lm, dt(dn), None,
               lambda j, dn=dn: experts(dn, j))
        if "shared_gate_up" in m:
            sgu, sdn = m["shared_gate_up"], m["shared_down"]
            inter = sdn.shape[1]
            loc = -(-inter // w)
            yield ("ffn/moe/shared_gate_up", Role.WEIGHTS, (dim, 2 * loc), lm, dt(sgu), None,
                   lambda j, sgu=sgu, inter=inter: _tp_gate_up(host(sgu), inter, w, j))
            yield ("ffn/moe/shared_down", Role.WEIGHTS, (loc, dim), lm, dt(sdn), None,
                   lambda j, sdn=sdn, inter=inter: _tp_down(host(sdn), inter, w, j))
            if "shared_gate" in m:
                yield rep("ffn/moe/shared_gate", Role.WEIGHTS, m["shared_gate"], True)


def model_rows(cfg: ModelConfig, weights: ModelWeights, num_weights_devices: int,
               layout: PoolLayout) -> dict[Role, int]:
    """Arena rows a model takes per KV device and per weights device (weights may be specs)."""
    out = {Role.KV: 0, Role.WEIGHTS: 0}
    for _, role, shape, items, dtype, _, _ in model_tensors(cfg, weights, num_weights_devices):
        out[role] += TensorSlot(role, 0, items, shape, dtype, layout.row_elems, layout.dtype).rows
    return out


def local_sizes(cfg: ModelConfig, num_weights_devices: int) -> tuple[int, int, int]:
    """(experts, shared intermediate, dense intermediate) per weights device."""
    w = num_weights_devices
    e = experts_per_device(cfg.num_experts, w) if cfg.moe_layers else 0
    s = -(-cfg.shared_intermediate_size // w) if cfg.moe_layers and cfg.shared_intermediate_size else 0
    d = -(-cfg.dense_intermediate_size // w) if cfg.dense_layers else 0
    return e, s, d


# ---- row allocation -------------------------------------------------------------------------------


class RowAllocator:
    """First-fit allocator of row ranges [0, capacity) (plain Python)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)] if capacity > 0 else []

    @property
    def free_rows(self) -> int:
        return sum(n for _, n in self._free)

    def largest_free(self) -> int:
        return max((n for _, n in self._free), default=0)

    def alloc(self, n: int) -> int | None:
        for i, (start, size) in enumerate(self._free):
            if size >= n:
                if size == n:
                    self._free.pop(i)
                else:
                    self._free[i] = (start + n, size - n)
                return start
        return None

    def release(self, start: int, n: int) -> None:
        self._free.append((start, n))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for s, k in self._free:
            if merged and merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + k)
            else:
                merged.append((s, k))
        self._free = merged


# ---- the store -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArenaDeviceReport:
    """Bytes of one device's arena by use."""

    device_id: int
    role: Role
    weights_bytes: dict[str, int]  # model -> bytes of its tensors here (row-padded)
    kv_pages_total: int
    arena_bytes: int


class ArenaStore:
    """The global arena array and what is placed in it.

    layout: page size / dtype / R of the arena (the KV pool's `PoolLayout`), num_pages = pages per
    device. attn_pages: pages at the start of each KV device's arena reserved for attention-side
    weights; the rest are KV pages (`kv_first_page`, `kv_pages`). Weights devices use their whole
    arena for FFN-side weights.

    `arena` is a jax.Array [N * num_pages, rows_per_page, R] sharded over the global mesh's `pool`
    axis (device i's shard is its arena). Every update donates it: use `store.arena` afresh.
    """

    def __init__(self, topology: PoolTopology | None, layout: PoolLayout, attn_pages: int, *,
                 colocated: jax.Device | None = None):
        if layout.num_pages < 1:
            raise ArenaError("the arena needs num_pages >= 1")
        if not 0 <= attn_pages < layout.num_pages:
            raise ArenaError(f"attn_pages={attn_pages} must leave KV pages in an arena of "
                             f"{layout.num_pages} pages")
        if (topology is None) == (colocated is None):
            raise ArenaError("give either a pool topology or one colocated device")
        self.topology = topology
        self.colocated = colocated is not None
        if colocated is not None:  # one device holding both roles (the shared/static baselines)
            self.devices: tuple[jax.Device, ...] = (colocated,)
            self.kv_devices = self.weights_devices = (colocated,)
            self.mesh = Mesh(np.array([colocated]), (POOL_AXIS,))
        else:
            self.devices = topology.devices
            self.kv_devices, self.weights_devices = topology.kv_devices, topology.weights_devices
            self.mesh = topology.global_mesh
        self.layout = layout
        self.attn_pages = attn_pages
        self.models: dict[str, ModelArena] = {}
        rpp = layout.rows_per_page
        kv_alloc = RowAllocator(attn_pages * rpp)
        self._alloc = {Role.KV: kv_alloc,
                       Role.WEIGHTS: kv_alloc if self.colocated else RowAllocator(layout.num_pages * rpp)}
        self.sharding = NamedSharding(self.mesh, P(POOL_AXIS))
        n = len(self.devices)
        shape = (n * layout.num_pages, rpp, layout.row_elems)
        dtype = jnp.dtype(_np_dtype(layout.dtype))
        self.arena: jax.Array = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.sharding)()

    # -- geometry --
    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_kv(self) -> int:
        return len(self.kv_devices)

    @property
    def num_weights(self) -> int:
        return len(self.weights_devices)

    @property
    def weights_index_base(self) -> int:
        """Position on the pool axis of the first weights device."""
        return 0 if self.colocated else self.num_kv

    @property
    def kv_first_page(self) -> int:
        return self.attn_pages

    @property
    def kv_pages(self) -> int:
        """KV pages per KV device."""
        return self.layout.num_pages - self.attn_pages

    def row_bytes(self) -> int:
        return self.layout.row_elems * self.layout.itemsize

    # -- placement --
    def plan_model(self, name: str, cfg: ModelConfig, weights: ModelWeights) -> ModelArena:
        """Allocates rows for every tensor; raises CapacityError (nothing allocated) if it does not fit."""
        if name in self.models:
            raise ArenaError(f"model {name!r} is already placed")
        tensors = [(t[0], TensorSlot(t[1], 0, t[3], t[2], t[4], self.layout.row_elems, self.layout.dtype))
                   for t in model_tensors(cfg, weights, self.num_weights)]
        need = {r: sum(sl.rows for _, sl in tensors if sl.role == r) for r in Role}
        free = {r: self._alloc[r].free_rows for r in Role}
        rb = self.row_bytes()
        short = (need[Role.KV] + need[Role.WEIGHTS] > free[Role.KV]) if self.colocated else \
            any(need[r] > free[r] for r in Role)
        if short:
            raise CapacityError(
                f"model {name!r} does not fit the arena: it needs {need[Role.KV] * rb} bytes of "
                f"attention-side weights per KV device and {need[Role.WEIGHTS] * rb} bytes of FFN "
                f"weights per weights device; free: {free[Role.KV] * rb} bytes of the "
                f"{self.attn_pages} pages reserved for weights on KV devices, "
                f"{free[Role.WEIGHTS] * rb} bytes on weights devices")
        rel: list[tuple[str, TensorSlot]] = []
        offset = {r: 0 for r in Role}
        for tname, slot in tensors:  # one contiguous block per role, in model_tensors' order
            rel.append((tname, dataclasses.replace(slot, row=offset[slot.role])))
            offset[slot.role] += slot.rows
        base: dict[Role, int] = {}
        try:
            for role in Role:
                start = self._alloc[role].alloc(need[role]) if need[role] else 0
                if start is None:
                    raise CapacityError(f"model {name!r}: the free weight rows are too fragmented "
                                        f"for its {role.value} block ({need[role] * rb} bytes)")
                base[role] = start
        except BaseException:
            for role, start in base.items():
                if need[role]:
                    self._alloc[role].release(start, need[role])
            raise
        e, s, d = local_sizes(cfg, self.num_weights)
        return ModelArena(name, ModelClass(cfg, tuple(rel), e, s, d), base)

    def place_model(self, name: str, cfg: ModelConfig, weights: ModelWeights) -> ModelArena:
        """Plans and writes a model's tensors into the arenas of their devices.

        Each device receives only its own piece (its experts / tensor-parallel columns); the arena
        is updated in place (donated) one tensor at a time, so the transient memory is one tensor.
        Requests of other models are not touched (their rows and pages are disjoint).
        """
        ma = self.plan_model(name, cfg, weights)
        try:
            for tname, _, _, _, _, _, pieces in model_tensors(cfg, weights, self.num_weights):
                self._write(ma.slots[tname], pieces)
        except BaseException:
            self._release(ma)
            raise
        self.models[name] = ma
        return ma

    def place_model_random(self, name: str, cfg: ModelConfig, seed: int = 0, scale: float = 0.02
                           ) -> ModelArena:
        """Plans a model from its shapes and fills its rows on the devices with random values
        (norms 1, router biases 0, everything else N(0, scale^2)): realistic-size models for
        benchmarks without building weights on the host. Each tensor is generated in place."""
        from crosspool_jax.models.params import weight_specs

        specs = weight_specs(cfg, jnp.dtype(_np_dtype(self.layout.dtype)))
        ma = self.plan_model(name, cfg, specs)
        try:
            for i, (tname, slot) in enumerate(sorted(ma.slots.items())):
                kind = 1 if "norm" in tname.rsplit("/", 1)[-1] else 0 if "router_bias" in tname else 2
                mask = np.array([d in self._pool_devices(slot.role) for d in self.devices])
                flags = jax.device_put(mask, self.sharding)
                key = jax.random.fold_in(jax.random.key(seed), i)
                fill = _filler(self.mesh, slot.rows, kind, scale)
                self.arena = fill(self.arena, flags, jnp.int32(slot.row), key)
        except BaseException:
            self._release(ma)
            raise
        self.models[name] = ma
        return ma

    def copy_out(self, name: str) -> HostModel:
        """Copies a placed model's rows to host memory, tensor by tensor and device by device (on
        GPUs into pinned host memory where the backend has it, else numpy arrays), and frees its
        rows. `copy_in` places it back, possibly at other rows."""
        ma = self.models[name]
        pieces: dict[str, tuple[Any, ...]] = {}
        shards = {s.device: s.data for s in self.arena.addressable_shards}
        r = self.layout.row_elems
        for tname, slot in ma.slots.items():
            pieces[tname] = tuple(
                _to_host(shards[dev].reshape(-1, r)[slot.row:slot.row + slot.rows], dev)
                for dev in self._pool_devices(slot.role))
        self.remove_model(name)
        return HostModel(ma.cls, pieces)

    def copy_in(self, name: str, host: HostModel,
                hold: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                ) -> ModelArena:
        """Places a model copied out by `copy_out` back (new rows, same class: the step programs of
        its class serve it unchanged). Raises CapacityError (nothing allocated) if it does not fit.
        Each tensor is one host-to-device copy per device plus the row writer `place_model` compiled
        for that tensor's row count. `hold()` is entered around the allocation and around each
        tensor's write (the engine passes its group lock: other models' steps run between tensors)."""
        with hold():
            if name in self.models:
                raise ArenaError(f"model {name!r} is already placed")
            base = self._alloc_block(name, host.cls)
        ma = ModelArena(name, host.cls, base)
        try:
            for tname, slot in ma.slots.items():
                devs = self._pool_devices(slot.role)
                src = host.pieces[tname]
                with hold():  # one tensor at a time: the steps of other models run in between
                    self._write_rows(slot, lambda dev, src=src, devs=devs: to_device(
                        src[devs.index(dev)], dev))
        except BaseException:
            with hold():
                self._release(ma)
            raise
        with hold():
            self.models[name] = ma
        return ma

    def _alloc_block(self, name: str, cls: ModelClass) -> dict[Role, int]:
        """Allocates one contiguous block of rows per role for a model of class `cls`."""
        need = {role: cls.rows(role) for role in Role}
        base: dict[Role, int] = {}
        try:
            for role in Role:
                start = self._alloc[role].alloc(need[role]) if need[role] else 0
                if start is None:
                    raise CapacityError(f"model {name!r} does not fit the arena: its {role.value} block "
                                        f"needs {need[role] * self.row_bytes()} bytes")
                base[role] = start
        except BaseException:
            for role, start in base.items():
                if need[role]:
                    self._alloc[role].release(start, need[role])
            raise
        return base

    def remove_model(self, name: str) -> None:
        """Frees a model's rows (the bytes stay until overwritten; nothing reads them)."""
        ma = self.models.pop(name, None)
        if ma is None:
            raise ArenaError(f"model {name!r} is not placed")
        self._release(ma)

    def _release(self, ma: ModelArena) -> None:
        for role in Role:
            if ma.rows(role):
                self._alloc[role].release(ma.base[role], ma.rows(role))

    def _pool_devices(self, role: Role) -> tuple[jax.Device, ...]:
        return self.kv_devices if role == Role.KV else self.weights_devices

    def _encode(self, slot: TensorSlot, arr: np.ndarray) -> np.ndarray:
        """Host array (all items) -> [rows, R] in the arena dtype."""
        adt = np.dtype(_np_dtype(self.layout.dtype))
        arr = np.asarray(arr)
        if arr.size != slot.items * int(np.prod(slot.shape)):
            raise ArenaError(f"tensor of shape {arr.shape} does not fit a slot of "
                             f"{slot.items} x {slot.shape}")
        arr = arr.reshape(slot.items, *slot.shape)
        if slot.bitcast:
            src = np.ascontiguousarray(arr.astype(_np_dtype(slot.dtype)))
            arr = src.view(adt)
        else:
            arr = arr.astype(adt)
        flat = arr.reshape(slot.items, slot.lead, -1)
        flat = _pad_axis(flat, 2, slot.last_padded)
        return np.ascontiguousarray(flat.reshape(slot.rows, self.layout.row_elems))

    def _write(self, slot: TensorSlot, pieces: TensorPieces) -> None:
        role_devs = self._pool_devices(slot.role)
        self._write_rows(slot, lambda dev: jax.device_put(
            self._encode(slot, pieces(role_devs.index(dev))), dev))

    def _write_rows(self, slot: TensorSlot, rows_on: Callable[[jax.Device], jax.Array]) -> None:
        """Writes `rows_on(device)` ([slot.rows, R] on that device) at the slot's rows of every
        device of its role."""
        devices = self.devices
        role_devs = self._pool_devices(slot.role)
        rows = slot.rows
        r = self.layout.row_elems
        adt = jnp.dtype(_np_dtype(self.layout.dtype))
        shards = []
        for dev in devices:
            if dev in role_devs:
                shards.append(rows_on(dev))
            else:  # every shard must have the same shape; these rows are not written (flag off)
                shards.append(jax.device_put(np.zeros((rows, r), adt), dev))
        mask = np.array([d in role_devs for d in devices])
        data = jax.make_array_from_single_device_arrays((len(devices) * rows, r), self.sharding, shards)
        flags = jax.device_put(mask, self.sharding)
        self.arena = _writer(self.mesh, rows)(self.arena, data, flags,
                                                              jnp.int32(slot.row))

    # -- reports --
    def memory_report(self) -> list[ArenaDeviceReport]:
        """Per device: bytes of each model's tensors held there, and KV pages (KV devices)."""
        rb = self.row_bytes()
        out = []
        for dev in self.devices:
            role = Role.KV if dev in self.kv_devices else Role.WEIGHTS
            roles = (Role.KV, Role.WEIGHTS) if self.colocated else (role,)
            wb = {name: sum(ma.rows(r) for r in roles) * rb for name, ma in self.models.items()}
            out.append(ArenaDeviceReport(dev.id, role, wb, self.kv_pages if role == Role.KV else 0,
                                         self.layout.num_pages * self.layout.page_bytes))
        return out


@dataclasses.dataclass(frozen=True)
class HostModel:
    """A sleeping model's weights in host memory: its class (tensor slots, relative rows) and, per
    tensor, one [rows, R] array per device of the tensor's role (in `_pool_devices` order)."""

    cls: ModelClass
    pieces: Mapping[str, tuple[Any, ...]]

    @property
    def nbytes(self) -> int:
        """Bytes held in host memory."""
        return sum(int(p.nbytes) for ps in self.pieces.values() for p in ps)


def _to_host(x: jax.Array, dev: jax.Device) -> Any:
    """`x` (on `dev`) copied to host memory: pinned host memory of `dev` where the backend has a
    "pinned_host" memory space (GPUs), else a numpy array (CPU)."""
    if dev.platform != "cpu":
        try:
            return jax.device_put(x, jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host"))
        except (ValueError, RuntimeError, NotImplementedError):
            pass
    return np.asarray(x)


def to_device(x: Any, dev: jax.Device) -> jax.Array:
    """A host copy (`_to_host`: numpy, or a jax array in pinned host memory) put on `dev`'s device
    memory. A pinned-host array must name the target memory kind: a plain `device_put(x, dev)`
    keeps its memory kind and is refused as a mismatch."""
    sharding = getattr(x, "sharding", None)
    if sharding is not None and getattr(sharding, "memory_kind", None) == "pinned_host":
        return jax.device_put(x, jax.sharding.SingleDeviceSharding(dev, memory_kind="device"))
    return jax.device_put(x, dev)


@functools.lru_cache(maxsize=64)
def _writer(mesh: Any, rows: int) -> Callable:
    """jit(shard_map): each flagged device writes its [rows, R] piece at `row` of its arena.

    donates: the arena.
    """

    def body(arena: jax.Array, data: jax.Array, flag: jax.Array, row: jax.Array) -> jax.Array:
        n, rpp, r = arena.shape
        flat = arena.reshape(n * rpp, r)
        old = jax.lax.dynamic_slice_in_dim(flat, row, rows, axis=0)
        new = jnp.where(flag[0], data, old)
        return jax.lax.dynamic_update_slice_in_dim(flat, new, row, axis=0).reshape(n, rpp, r)

    f = shard_map(body, mesh, in_specs=(P(POOL_AXIS), P(POOL_AXIS), P(POOL_AXIS), P()),
                  out_specs=P(POOL_AXIS))
    return jax.jit(f, donate_argnums=(0,))


@functools.lru_cache(maxsize=64)
def _filler(mesh: Any, rows: int, kind: int, scale: float) -> Callable:
    """jit(shard_map): flagged devices fill [rows, R] at `row` with 0 / 1 / N(0, scale^2).

    donates: the arena.
    """

    def body(arena: jax.Array, flag: jax.Array, row: jax.Array, key: jax.Array) -> jax.Array:
        n, rpp, r = arena.shape
        flat = arena.reshape(n * rpp, r)
        if kind == 2:
            # the same values on every device of the role: replicated tensors stay identical
            data = (jax.random.normal(key, (rows, r), jnp.float32) * scale).astype(arena.dtype)
        else:
            data = jnp.full((rows, r), float(kind), arena.dtype)
        old = jax.lax.dynamic_slice_in_dim(flat, row, rows, axis=0)
        new = jnp.where(flag[0], data, old)
        return jax.lax.dynamic_update_slice_in_dim(flat, new, row, axis=0).reshape(n, rpp, r)

    f = shard_map(body, mesh, in_specs=(P(POOL_AXIS), P(POOL_AXIS), P(), P()), out_specs=P(POOL_AXIS))
    return jax.jit(f, donate_argnums=(0,))


def ffn_kind_index(cfg: ModelConfig, layer: int) -> tuple[FFNKind, int]:
    return cfg.ffn_kinds[layer], cfg.ffn_stack_index[layer]
