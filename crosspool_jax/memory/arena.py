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

This module is host-side: the books (`ArenaBook`, plain Python: rows per model and role, no
devices) and the writer (`ArenaStore`, an `ArenaBook` with the devices and the jax array), which
places a model's tensors with one jitted, donated in-place update per tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from crosspool_jax.errors import CapacityError, CrossPoolError
from crosspool_jax.memory.topology import POOL_AXIS, PoolTopology, Role, experts_per_device
from crosspool_jax.models.config import AttentionKind, ModelConfig
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

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.config, self.slots, self.experts_local, self.shared_local, self.dense_local))

    def __hash__(self) -> int:
        # computed once: every step looks its programs up by spec, and a spec's hash reaches this
        return self._hash

    def __eq__(self, other: object) -> bool:
        # equal classes are often distinct objects (one per model): the hashes settle most
        # comparisons before the configs and slot tables are compared field by field
        if self is other:
            return True
        if not isinstance(other, ModelClass) or self._hash != other._hash:
            return False
        return (self.config, self.slots, self.experts_local, self.shared_local, self.dense_local) == (
            other.config, other.slots, other.experts_local, other.shared_local, other.dense_local)

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


TensorEntry = tuple[str, Role, tuple[int, ...], int, str, TensorSlot | None, TensorPieces]


def model_tensors(cfg: ModelConfig, weights: ModelWeights, num_weights_devices: int
                  ) -> Iterator[TensorEntry]:
    """Yields (name, role, per-item shape, items, dtype, None, pieces) for every stored tensor.

    A-side: GQA q/k/v are fused into ``wqkv [D, (H + 2K) * Dh]`` (one weight read); a tied LM
    head is stored transposed as ``lm_head [D, V]``. F-side: experts, shared experts and dense FFN
    sharded as the module docstring says. Nothing is read until a piece is called (the weights may
    be arrays or ShapeDtypeStructs).
    """
    yield from _attention_tensors(cfg, weights.attn)
    yield from _ffn_tensors(weights.ffn, num_weights_devices)


def _host(x: Any) -> np.ndarray:
    return np.asarray(x)


def _dtype_name(x: Any) -> str:
    return str(np.dtype(x.dtype))


def _replicated(name: str, role: Role, arr: Any, stacked: bool,
                get: Callable[[], np.ndarray] | None = None) -> TensorEntry:
    """A tensor every device of its role holds whole (stacked: its first axis is the items)."""
    shape = arr.shape[1:] if stacked else arr.shape
    items = arr.shape[0] if stacked else 1
    get = get or (lambda arr=arr: _host(arr))
    return name, role, tuple(shape), items, _dtype_name(arr), None, (lambda j: get())


def _attention_tensors(cfg: ModelConfig, a: dict[str, Any]) -> Iterator[TensorEntry]:
    """`model_tensors`' A-side (KV devices)."""
    yield _replicated("attn/embed", Role.KV, a["embed"], False)
    yield _replicated("attn/final_norm", Role.KV, a["final_norm"], False)
    if cfg.tie_word_embeddings:
        e = a["embed"]
        yield _replicated("attn/lm_head", Role.KV, jax.ShapeDtypeStruct(e.shape[::-1], e.dtype), False,
                          lambda e=e: np.ascontiguousarray(_host(e).T))
    else:
        yield _replicated("attn/lm_head", Role.KV, a["lm_head"], False)
    layers = dict(a["layers"])
    if cfg.attention == AttentionKind.GQA:
        for fused, parts in (("wqkv", ("wq", "wk", "wv")), ("bqkv", ("bq", "bk", "bv"))):
            if parts[0] not in layers:
                continue
            arrs = [layers.pop(p) for p in parts]
            spec = jax.ShapeDtypeStruct((*arrs[0].shape[:-1], sum(x.shape[-1] for x in arrs)),
                                        arrs[0].dtype)
            yield _replicated(f"attn/layers/{fused}", Role.KV, spec, True,
                              lambda arrs=arrs: np.concatenate([_host(x) for x in arrs], -1))
    for k, v in layers.items():
        yield _replicated(f"attn/layers/{k}", Role.KV, v, True)


def _tensor_parallel_pair(gate_up_name: str, down_name: str, gu: Any, dn: Any, w: int
                          ) -> Iterator[TensorEntry]:
    """A SwiGLU's stacked gate/up [L, D, 2I] and down [L, I, D] split over `w` weights devices by
    intermediate columns (each device `cdiv(I, w)` of them, zero-padded)."""
    items, dim = gu.shape[0], gu.shape[1]
    inter = dn.shape[1]
    loc = -(-inter // w)
    yield (gate_up_name, Role.WEIGHTS, (dim, 2 * loc), items, _dtype_name(gu), None,
           lambda j: _tp_gate_up(_host(gu), inter, w, j))
    yield (down_name, Role.WEIGHTS, (loc, dn.shape[2]), items, _dtype_name(dn), None,
           lambda j: _tp_down(_host(dn), inter, w, j))


def _ffn_tensors(f: dict[str, Any], w: int) -> Iterator[TensorEntry]:
    """`model_tensors`' F-side over `w` weights devices: dense FFN and shared experts
    tensor-parallel, routed experts split by expert."""
    if "dense" in f:
        yield from _tensor_parallel_pair("ffn/dense/w_gate_up", "ffn/dense/w_down",
                                         f["dense"]["w_gate_up"], f["dense"]["w_down"], w)
    if "moe" not in f:
        return
    m = f["moe"]
    lm, num_e, dim, two_i = m["w_gate_up"].shape
    e_loc = experts_per_device(num_e, w)
    yield _replicated("ffn/moe/router", Role.WEIGHTS, m["router"], True)
    if "router_bias" in m:
        yield _replicated("ffn/moe/router_bias", Role.WEIGHTS, m["router_bias"], True)
    gu, dn = m["w_gate_up"], m["w_down"]

    def experts(arr: Any, j: int) -> np.ndarray:
        lo, hi = j * e_loc, min((j + 1) * e_loc, num_e)
        part = _host(arr[:, lo:hi]) if hi > lo else np.zeros((lm, 0, *arr.shape[2:]), np.dtype(arr.dtype))
        return _pad_axis(part, 1, e_loc)

    yield ("ffn/moe/w_gate_up", Role.WEIGHTS, (e_loc, dim, two_i), lm, _dtype_name(gu), None,
           lambda j, gu=gu: experts(gu, j))
    yield ("ffn/moe/w_down", Role.WEIGHTS, (e_loc, two_i // 2, dim), lm, _dtype_name(dn), None,
           lambda j, dn=dn: experts(dn, j))
    if "shared_gate_up" in m:
        yield from _tensor_parallel_pair("ffn/moe/shared_gate_up", "ffn/moe/shared_down",
                                         m["shared_gate_up"], m["shared_down"], w)
        if "shared_gate" in m:
            yield _replicated("ffn/moe/shared_gate", Role.WEIGHTS, m["shared_gate"], True)


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


NO_GUARD = nullcontext()  # `place_model` without a stepping thread to keep out
COPY_CHUNK_BYTES = 256 << 20  # per device: a sleep's reads and a wake's writes go in chunks this large


class ArenaBook:
    """The books of a group's arenas without the arenas: which rows each placed model's tensors take
    per role, and where the KV pages start. Plain Python, no devices, no array: what the host-side
    scheduling needs (`ArenaStore` adds the devices and the jax array; the simulator in
    benchmarks/sim runs `GroupRunner` over a book alone).

    layout: page size / dtype / R of the arena (the KV pool's `PoolLayout`), num_pages = pages per
    device. attn_pages: pages at the start of each KV device's arena reserved for attention-side
    weights; the rest are KV pages (`kv_first_page`, `kv_pages`). Weights devices use their whole
    arena for FFN-side weights. num_kv / num_weights: devices of each role; colocated: one device
    holding both roles (then num_kv = num_weights = 1).
    """

    topology: PoolTopology | None = None
    kv_devices: tuple[Any, ...] = ()  # a book has no devices (ArenaStore: the jax devices)

    def __init__(self, layout: PoolLayout, attn_pages: int, num_kv: int, num_weights: int,
                 colocated: bool = False):
        if layout.num_pages < 1:
            raise ArenaError("the arena needs num_pages >= 1")
        if not 0 <= attn_pages < layout.num_pages:
            raise ArenaError(f"attn_pages={attn_pages} must leave KV pages in an arena of "
                             f"{layout.num_pages} pages")
        if colocated and (num_kv, num_weights) != (1, 1):
            raise ArenaError("a colocated arena is one device holding both roles")
        if num_kv < 1 or num_weights < 1:
            raise ArenaError(f"an arena group needs KV and weights devices, got {num_kv}+{num_weights}")
        self.colocated = colocated
        self._counts = (num_kv, num_weights)
        self.layout = layout
        self.attn_pages = attn_pages
        self.models: dict[str, ModelArena] = {}
        # one object per distinct class: lane keys then compare by identity, not field by field
        self._classes: dict[ModelClass, ModelClass] = {}
        rpp = layout.rows_per_page
        kv_alloc = RowAllocator(attn_pages * rpp)
        self._alloc = {Role.KV: kv_alloc,
                       Role.WEIGHTS: kv_alloc if self.colocated else RowAllocator(layout.num_pages * rpp)}

    # -- geometry --
    @property
    def num_devices(self) -> int:
        return 1 if self.colocated else self._counts[0] + self._counts[1]

    @property
    def num_kv(self) -> int:
        return self._counts[0]

    @property
    def num_weights(self) -> int:
        return self._counts[1]

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
        base = self._alloc_block(name, need)
        e, s, d = local_sizes(cfg, self.num_weights)
        cls = ModelClass(cfg, tuple(rel), e, s, d)
        return ModelArena(name, self._classes.setdefault(cls, cls), base)

    def place_model(self, name: str, cfg: ModelConfig, weights: ModelWeights,
                    guard: AbstractContextManager = NO_GUARD) -> ModelArena:
        """`write_model`, then registers the model (under `guard`): plans and, in an `ArenaStore`,
        writes its tensors (a book holds no values: nothing is written)."""
        ma = self.write_model(name, cfg, weights, guard)
        with guard:
            self.models[name] = ma
        return ma

    def write_model(self, name: str, cfg: ModelConfig, weights: ModelWeights,
                    guard: AbstractContextManager = NO_GUARD) -> ModelArena:
        """`place_model` without the registration: the rows are allocated (a book writes nothing)
        and `models` does not hold the model yet (the caller registers it under `guard`)."""
        with guard:
            return self.plan_model(name, cfg, weights)

    def place_model_random(self, name: str, cfg: ModelConfig, seed: int = 0, scale: float = 0.02,
                           guard: AbstractContextManager = NO_GUARD) -> ModelArena:
        """`write_model_random`, then registers the model (under `guard`)."""
        ma = self.write_model_random(name, cfg, seed, scale, guard)
        with guard:
            self.models[name] = ma
        return ma

    def write_model_random(self, name: str, cfg: ModelConfig, seed: int = 0, scale: float = 0.02,
                           guard: AbstractContextManager = NO_GUARD) -> ModelArena:
        """Plans a model from its shapes (`params.weight_specs`), not registered; a book holds no
        values, so `seed` and `scale` only matter to `ArenaStore`, which fills the rows."""
        from crosspool_jax.models.params import weight_specs

        specs = weight_specs(cfg, jnp.dtype(_np_dtype(self.layout.dtype)))
        return ArenaBook.write_model(self, name, cfg, specs, guard)

    def _alloc_block(self, name: str, need: Mapping[Role, int]) -> dict[Role, int]:
        """Allocates one contiguous block of `need[role]` rows per role; returns each block's first
        row. CapacityError (nothing allocated) when a block does not fit."""
        base: dict[Role, int] = {}
        try:
            for role in Role:
                start = self._alloc[role].alloc(need[role]) if need[role] else 0
                if start is None:
                    raise CapacityError(f"model {name!r}: the free weight rows are too fragmented "
                                        f"for its {role.value} block ({need[role] * self.row_bytes()} bytes)")
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


class ArenaStore(ArenaBook):
    """The global arena array and what is placed in it (the books are `ArenaBook`'s).

    `arena` is a jax.Array [N * num_pages, rows_per_page, R] sharded over the global mesh's `pool`
    axis (device i's shard is its arena). Every update donates it: use `store.arena` afresh.
    """

    def __init__(self, topology: PoolTopology | None, layout: PoolLayout, attn_pages: int, *,
                 colocated: jax.Device | None = None):
        if (topology is None) == (colocated is None):
            raise ArenaError("give either a pool topology or one colocated device")
        self.topology = topology
        if colocated is not None:  # one device holding both roles (the shared/static baselines)
            self.devices: tuple[jax.Device, ...] = (colocated,)
            self.kv_devices = self.weights_devices = (colocated,)
            self.mesh = Mesh(np.array([colocated]), (POOL_AXIS,))
        else:
            self.devices = topology.devices
            self.kv_devices, self.weights_devices = topology.kv_devices, topology.weights_devices
            self.mesh = topology.global_mesh
        super().__init__(layout, attn_pages, len(self.kv_devices), len(self.weights_devices),
                         colocated=colocated is not None)
        self.sharding = NamedSharding(self.mesh, P(POOL_AXIS))
        n = len(self.devices)
        shape = (n * layout.num_pages, layout.rows_per_page, layout.row_elems)
        dtype = jnp.dtype(_np_dtype(layout.dtype))
        self.arena_shape, self.arena_dtype = shape, dtype
        self.arena: jax.Array = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=self.sharding)()
        # placement programs (tensor writers, random fills) compiled ahead of time, by row count
        self._update_programs: dict[tuple, Any] = {}
        self.host_copier = HostCopier()  # sleeping models' host copies (pinned within a budget)
        self._scratch: dict[tuple, jax.Array] = {}  # the writers' zero shards, role flags (not donated)

    def write_model(self, name: str, cfg: ModelConfig, weights: ModelWeights,
                    guard: AbstractContextManager = NO_GUARD) -> ModelArena:
        """Plans and writes a model's tensors into the arenas of their devices, not registered
        (`place_model` registers it; a caller registering it with whatever else must appear at the
        same moment does so under `guard`); on error the rows are released.

        Each device receives only its own piece (its experts / tensor-parallel columns); the arena
        is updated in place (donated) one tensor at a time, so the transient memory is one tensor.
        Requests of other models are not touched (their rows and pages are disjoint). `guard` (the
        lock a stepping thread holds around its steps) is held only around what touches the
        arena array or the books: row allocation and each tensor's in-place write; encoding, the
        host-to-device copy and compiling the writer run outside it, so a placement pauses other
        models' steps for a few dispatches, not for its copy."""
        with guard:
            ma = self.plan_model(name, cfg, weights)
        try:
            for tname, _, _, _, _, _, pieces in model_tensors(cfg, weights, self.num_weights):
                self._write(ma.slots[tname], pieces, guard)
        except BaseException:
            with guard:
                self._release(ma)
            raise
        return ma

    def write_model_random(self, name: str, cfg: ModelConfig, seed: int = 0, scale: float = 0.02,
                           guard: AbstractContextManager = NO_GUARD) -> ModelArena:
        """Plans a model from its shapes and fills its rows on the devices with random values
        (norms 1, router biases 0, everything else N(0, scale^2)): realistic-size models for
        benchmarks without building weights on the host. Each tensor is generated in place; the
        fill programs compile outside `guard`. Not registered (`write_model`)."""
        from crosspool_jax.models.params import weight_specs

        specs = weight_specs(cfg, jnp.dtype(_np_dtype(self.layout.dtype)))
        with guard:
            ma = self.plan_model(name, cfg, specs)
        try:
            for i, (tname, slot) in enumerate(sorted(ma.slots.items())):
                kind = 1 if "norm" in tname.rsplit("/", 1)[-1] else 0 if "router_bias" in tname else 2
                mask = np.array([d in self._pool_devices(slot.role) for d in self.devices])
                flags = jax.device_put(mask, self.sharding)
                key = jax.random.fold_in(jax.random.key(seed), i)
                row = jnp.int32(slot.row)
                fill = self._compiled(("fill", slot.rows, kind, scale),
                                      _filler(self.mesh, slot.rows, kind, scale), flags, row, key)
                with guard:
                    self.arena = fill(self.arena, flags, row, key)
        except BaseException:
            with guard:
                self._release(ma)
            raise
        return ma

    def _compiled(self, key: tuple, jitted: Any, *args: Any) -> Callable:
        """The arena-updating program `jitted` compiled ahead of time for this arena and `args`
        (kept per `key`): compiled on the calling thread, outside any guard."""
        prog = self._update_programs.get(key)
        if prog is None:
            arena = jax.ShapeDtypeStruct(self.arena_shape, self.arena_dtype, sharding=self.sharding)
            prog = jitted.lower(arena, *args).compile()
            self._update_programs[key] = prog
        return prog

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

    def _write(self, slot: TensorSlot, pieces: TensorPieces,
               guard: AbstractContextManager = NO_GUARD) -> None:
        """Copies one tensor's pieces to their devices, then (under `guard`) writes them at the
        slot's rows of the arena (donated)."""
        role_devs = self._pool_devices(slot.role)
        self._write_rows(slot.role, slot.row, slot.rows, lambda dev: jax.device_put(
            self._encode(slot, pieces(role_devs.index(dev))), dev), guard)

    def _write_rows(self, role: Role, row: int, rows: int, rows_on: Callable[[jax.Device], jax.Array],
                    guard: AbstractContextManager) -> None:
        """Writes `rows_on(device)` ([rows, R] on that device) at `row` of the arena of every device
        of `role` (one dispatch of the AOT-compiled writer, under `guard`; the arena is donated)."""
        data = self._rows_array(role, rows, rows_on)
        flags = self._role_flags(role)
        row_arg = jnp.int32(row)
        write = self._compiled(("write", rows), _writer(self.mesh, rows), data, flags, row_arg)
        with guard:
            self.arena = write(self.arena, data, flags, row_arg)

    def _rows_array(self, role: Role, rows: int, rows_on: Callable[[jax.Device], jax.Array]) -> jax.Array:
        """[N * rows, R] over the pool axis: `rows_on(device)` on the devices of `role`, zeros on
        the others (every shard must have the same shape; the writer leaves those rows alone)."""
        shards = []
        for dev in self.devices:
            if dev.process_index != jax.process_index():
                continue  # another process's device: that process writes its own piece (multi-host)
            if dev in self._pool_devices(role):
                shards.append(rows_on(dev))
            else:
                key = ("zeros", rows, dev.id)
                if key not in self._scratch:  # never donated: one per shape and device
                    self._scratch[key] = jax.device_put(
                        np.zeros((rows, self.layout.row_elems), _np_dtype(self.layout.dtype)), dev)
                shards.append(self._scratch[key])
        return jax.make_array_from_single_device_arrays(
            (len(self.devices) * rows, self.layout.row_elems), self.sharding, shards)

    def _role_flags(self, role: Role) -> jax.Array:
        """[N] bool over the pool axis: which devices hold `role`."""
        key = ("flags", role)
        if key not in self._scratch:
            mask = np.array([d in self._pool_devices(role) for d in self.devices])
            self._scratch[key] = jax.device_put(mask, self.sharding)
        return self._scratch[key]

    # -- sleeping models --
    def copy_chunks(self, rows: int) -> list[tuple[int, int]]:
        """(start, rows) pieces of a block of `rows` rows, each at most `COPY_CHUNK_BYTES` per device:
        the unit of a sleep's reads and a wake's writes (bounded scratch memory next to the arena;
        a chunk's host-to-device copy overlaps the previous chunk's write)."""
        step = max(1, COPY_CHUNK_BYTES // self.row_bytes())
        return [(s, min(step, rows - s)) for s in range(0, rows, step)]

    def copy_out(self, name: str, guard: AbstractContextManager = NO_GUARD) -> HostModel:
        """Copies a placed model's rows to host memory, one role block in chunks per device (on GPUs
        into pinned host memory within `host_copier`'s budget, else numpy arrays), waited for, and
        compiles the writers `copy_in` will use, so a wake compiles nothing. `guard` is held around
        each read's dispatch only. The model stays placed: the caller removes it
        (`remove_model`)."""
        ma = self.models[name]
        blocks: dict[Role, list[tuple[Any, ...]]] = {}
        for role in Role:
            devs = self._pool_devices(role)
            blocks[role] = []
            for start, rows in self.copy_chunks(ma.rows(role)):
                row_arg = jnp.int32(ma.base[role] + start)
                read = self._compiled(("read", rows), _reader(self.mesh, rows), row_arg)
                with guard:
                    out = read(self.arena, row_arg)
                shards = {sh.device: sh.data for sh in out.addressable_shards}
                blocks[role].append(tuple(self._host_copy(shards[d], d) for d in devs))
                data = jax.ShapeDtypeStruct((len(self.devices) * rows, self.layout.row_elems),
                                            self.arena_dtype, sharding=self.sharding)
                self._compiled(("write", rows), _writer(self.mesh, rows), data, self._role_flags(role),
                               row_arg)
        return HostModel(ma.cls, blocks)

    def _host_copy(self, x: jax.Array, dev: jax.Device) -> Any:
        """`x` in host memory (`HostCopier`), waited for; a pinned copy that fails (the pool is
        full: XLA allocates it on the way) is made again as a numpy array."""
        out = self.host_copier.copy(x, dev)
        try:
            jax.block_until_ready(out)
        except RuntimeError:
            out = np.asarray(x)
        return out

    def copy_in(self, name: str, host: HostModel, guard: AbstractContextManager = NO_GUARD) -> ModelArena:
        """Places a model copied out by `copy_out` back, not registered (new rows, same class: the
        step programs of its class serve it unchanged). Per chunk: one host-to-device copy per
        device, then the writer `copy_out` compiled, dispatched under `guard` (other models' steps
        run between chunks). CapacityError (nothing allocated) when it does not fit."""
        need = {role: host.cls.rows(role) for role in Role}
        with guard:
            if name in self.models:
                raise ArenaError(f"model {name!r} is already placed")
            base = self._alloc_block(name, need)
        ma = ModelArena(name, self._classes.setdefault(host.cls, host.cls), base)
        try:
            for role in Role:
                devs = self._pool_devices(role)
                chunks = zip(self.copy_chunks(need[role]), host.blocks[role], strict=True)
                for (start, rows), pieces in chunks:
                    self._write_rows(role, base[role] + start, rows,
                                     lambda dev, p=pieces, d=devs: to_device(p[d.index(dev)], dev), guard)
        except BaseException:
            with guard:
                self._release(ma)
            raise
        return ma

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
    role, its block's chunks (`ArenaStore.copy_chunks`), each one [rows, R] array per device of
    the role (in `_pool_devices` order)."""

    cls: ModelClass
    blocks: Mapping[Role, list[tuple[Any, ...]]]

    @property
    def nbytes(self) -> int:
        """Bytes held in host memory."""
        return sum(int(p.nbytes) for chunks in self.blocks.values() for ps in chunks for p in ps)


def placed_weight_bytes(store: ArenaBook, name: str) -> int:
    """Arena bytes of a placed model's weights over all the group's devices (its load)."""
    ma = store.models[name]
    return (ma.rows(Role.KV) * store.num_kv + ma.rows(Role.WEIGHTS) * store.num_weights) * store.row_bytes()


def pinned_host_budget() -> int:
    """Bytes of pinned host memory sleeping models may take per process: 90% of XLA's pinned host
    pool on GPUs (`XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB`, default 64 GiB; set it before JAX starts to
    keep more sleeping models pinned), the rest left for XLA's own transfer staging."""
    return int(float(os.environ.get("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "64")) * (1 << 30) * 0.9)


class HostCopier:
    """Copies device arrays to host memory: into pinned host memory of their device (a fast,
    asynchronous host-to-device copy back) while the pinned bytes it holds stay within `budget`,
    else (CPU backends, a full pinned pool, a backend without one) into numpy arrays (pageable: a
    slower copy back). Pinned bytes are counted until the array is collected."""

    def __init__(self, budget: int | None = None):
        self.budget = pinned_host_budget() if budget is None else budget
        self.pinned_bytes = 0
        self._lock = threading.Lock()

    def _unpin(self, nbytes: int) -> None:
        with self._lock:
            self.pinned_bytes -= nbytes

    def copy(self, x: jax.Array, dev: jax.Device) -> Any:
        """`x` (on `dev`) copied to host memory (not waited for: block on the result)."""
        nbytes = int(x.nbytes)
        if dev.platform != "cpu":
            with self._lock:
                fits = self.pinned_bytes + nbytes <= self.budget
                self.pinned_bytes += nbytes if fits else 0
            if fits:
                try:
                    out = jax.device_put(x, jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host"))
                except (ValueError, RuntimeError, NotImplementedError):
                    self._unpin(nbytes)
                else:
                    weakref.finalize(out, self._unpin, nbytes)
                    return out
        return np.asarray(x)


def to_device(x: Any, dev: jax.Device) -> jax.Array:
    """A host copy (`HostCopier.copy`: numpy, or a jax array in pinned host memory) put on `dev`'s device
    memory. A pinned-host array must name the target memory kind: a plain `device_put(x, dev)`
    keeps its memory kind and is refused as a mismatch."""
    sharding = getattr(x, "sharding", None)
    if sharding is not None and getattr(sharding, "memory_kind", None) == "pinned_host":
        return jax.device_put(x, jax.sharding.SingleDeviceSharding(dev, memory_kind="device"))
    return jax.device_put(x, dev)


@functools.lru_cache(maxsize=64)
def _reader(mesh: Any, rows: int) -> Callable:
    """jit(shard_map): every device's [rows, R] at `row` of its arena, as [N * rows, R] over the
    pool axis (a copy: later writes to those rows do not change it). Donates nothing."""

    def body(arena: jax.Array, row: jax.Array) -> jax.Array:
        n, rpp, r = arena.shape
        return jax.lax.dynamic_slice_in_dim(arena.reshape(n * rpp, r), row, rows, axis=0)

    return jax.jit(shard_map(body, mesh, in_specs=(P(POOL_AXIS), P()), out_specs=P(POOL_AXIS)))


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

