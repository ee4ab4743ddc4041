"""The one-program step: a batch mixing requests of several models, over both pools, as ONE XLA program.

`build_step(spec, store)` returns a jitted function ``step(arena, inputs) -> (arena, tokens)`` that
runs SPMD (shard_map) over the global mesh (KV devices first, then weights devices). Every device
runs the same program on its own arena shard (crosspool_jax/memory/arena.py), and the role decides what
is real work and what is empty:

per layer, per model ("lane"):
  A-side on the KV devices: input norm -> fused qkv (or MLA projections), read in place from the
    arena with `arena_grouped_matmul` (size 0 on weights devices: no work) -> rotary -> KV append
    into the shared pages (`kv_append`, slots -1 elsewhere) -> paged attention (`pallas_kernels`,
    lengths 0 elsewhere) -> [split-KV combine across devices] -> output projection -> residual ->
    post-attention norm.
  dispatch: `all_gather` of the normed hidden states over the pool axis; the weights devices take
    the KV devices' rows.
  F-side on the weights devices: router (replicated), the local experts as a grouped matmul over
    the arena (empty groups skipped; size 0 on KV devices), shared experts / dense FFN as
    tensor-parallel partial sums.
  combine: `psum` of the partial FFN outputs; each KV device takes its rows and adds the residual.
then the LM head on the sampled rows, on-device sampling (`crosspool_jax.execution.sampling`) and stop
checks; a decode program runs ``spec.steps`` tokens per call (control lowering: one host call per
K tokens).

Split-KV across KV devices: a request whose KV does not fit one device has its older tokens in
"extra" segments on other KV devices. Its queries are all-gathered, each device computes the
partial attention of the segments it holds (with the log-sum-exp), and a pmax / psum softmax
combine merges them, so one request can use the KV of the whole pool.

Lanes and model classes: a lane runs the slots of up to G models of one `ModelClass` (equal
configs and arena layouts); every projection and the experts are grouped matmuls whose groups are
(model) or (model, expert), reading each model's weights at its base row, and the norms/biases
are gathered per row. The models' base rows are inputs, so one compiled program serves every
model of a class and the number of programs does not grow with the number of models.

Ping-pong: with ``micro_batches=2`` each model's slots are two lanes whose layers interleave, so
the attention of one can run on the KV devices while the experts of the other run on the weights
devices.

Everything per device below is written for ONE device's shard (shapes without the device axis).
Inputs per lane (device shard shapes; B slots, T query tokens, L layers, P pages per layer row,
X extra segments, C query rows per extra):
    tokens [T] int32, positions [T] int32 (absolute), tok_slot [T] int32 (-1: padding row),
    cu_q [B + 1] int32 (prefill only), tail_pages [B, L, P] int32 (arena page ids), tail_start [B]
    int32 (absolute position of the tail segment's first token), tail_len [B] int32 (tokens of the
    tail segment after this call's first append; 0: empty slot), sample_row [B] int32 (row of
    `tokens` whose logits are sampled, -1: none), temperature [B] f32, top_k [B] int32, top_p [B]
    f32, seed [B, 2] uint32, remaining [B] int32 (decode: tokens the slot may still produce),
    stop_ids [B, S] int32 (-1 pad); the lane's models (G of one class): a_base [G], f_base [G]
    int32 (each model's first arena row on KV / weights devices), grp_rows [G] int32 (query rows
    of each model; rows and slots are sorted by model), grp_slots [G] int32, tok_grp [T] int32,
    slot_grp [B] int32 (model of each row / slot); extras: x_rows [X, C] int32 (global query rows,
    -1 pad), x_pages [X, L, P] int32, x_len [X] int32.
Output per lane: tokens [K, B] int32 (-1: no token). The arena is donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from crosspool_jax.execution.sampling import sample_tokens
from crosspool_jax.memory.arena import ArenaStore, ModelClass, TensorSlot, shard_map
from crosspool_jax.memory.topology import POOL_AXIS, Role
from crosspool_jax.models.config import AttentionKind, FFNKind, ModelConfig, QKNorm
from crosspool_jax.models.layers import apply_rope, rms_norm, rope_cos_sin
from crosspool_jax.models.moe import group_counts, route_logits
from pallas_kernels import dispatch, kv_append, mla_kv_append, paged_decode_attention
from pallas_kernels.arena_matmul import arena_grouped_matmul
from pallas_kernels.page_layout import KVSpec, PageGeometry, PoolLayout, page_geometry


def kv_spec(cfg: ModelConfig) -> KVSpec:
    if cfg.attention == AttentionKind.MLA:
        return KVSpec.mla(cfg.kv_lora_rank, cfg.qk_rope_head_dim)
    return KVSpec.gqa(cfg.num_kv_heads, cfg.head_dim)


def model_geometry(cfg: ModelConfig, layout: PoolLayout, platform: str) -> PageGeometry:
    """The model's page geometry in the arena (tokens per page from the page size)."""
    return page_geometry(kv_spec(cfg), layout, platform=platform)


@dataclasses.dataclass(frozen=True)
class LaneShape:
    """Static shape of one lane: slots of up to `groups` models of ONE class (equal configs and
    arena layouts), or half of them with two micro-batches. Which models they are is an input
    (their base rows), so one compiled program serves any models of the class."""

    cls: ModelClass
    groups: int  # G: models the lane can hold (unused groups get 0 rows)
    slots: int  # B per KV device
    tokens: int  # T per KV device (decode: == slots, row b is slot b's token)
    max_pages: int  # P
    extras: int = 0  # X per device (0: no split request in this call)
    extra_rows: int = 1  # C query rows per extra segment
    stop_width: int = 1  # S

    def __post_init__(self) -> None:
        if self.groups < 1:
            raise ValueError(f"a lane needs groups >= 1, got {self.groups}")
        if self.groups > 1 and self.cls.config.attention == AttentionKind.MLA:
            # MLA's absorbed wkv_b is applied per head with einsums, not a grouped matmul
            raise ValueError("MLA lanes hold one model (groups=1)")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything that shapes the compiled program (a new spec compiles a new program)."""

    lanes: tuple[LaneShape, ...]
    decode: bool  # True: one token per slot, `steps` tokens per call; False: one prefill chunk
    steps: int = 1
    backend: str | None = None  # attention kernels' backend (None: from the platform)
    attention_schedule: str = "split"
    attention_kernels: str = dispatch.DEFAULT_ATTENTION_KERNELS  # `dispatch.ATTENTION_KERNELS`
    matmul_backend: str | None = None  # arena matmul backend (None: the Pallas kernel on GPU,
    # "reference" = XLA's ragged_dot over sliced weights elsewhere)
    unroll_layers: bool = False  # True: every layer emitted straight (no loop; benchmarks compare)
    # GQA prefill: one-row segments (a mixed step's decode rows) in the decode attention kernel
    one_row_decode: bool = False


# ---- reading the arena ------------------------------------------------------------------------------


class _Reader:
    """Reads the tensors of a lane's models (one class, G of them) from one device's flat arena
    rows [rows, R]. a_base / f_base [G] int32: each model's base row on KV / weights devices."""

    def __init__(self, arena: jax.Array, cls: ModelClass, a_base: jax.Array, f_base: jax.Array,
                 backend: str | None):
        self.rows = arena.reshape(-1, arena.shape[-1])
        self.cls = cls
        self.bases = {Role.KV: a_base.astype(jnp.int32), Role.WEIGHTS: f_base.astype(jnp.int32)}
        self.groups = a_base.shape[0]
        self.backend = backend

    def _start(self, name: str, item: int) -> tuple[TensorSlot, jax.Array]:
        s = self.cls.slot(name)
        return s, self.bases[s.role] + s.item_row(item)  # [G] first rows

    def stacked(self, name: str, item: int = 0) -> jax.Array:
        """A small tensor of every model of the lane (norms, biases, router, wkv_b): [G, *shape]."""
        s, starts = self._start(name, item)

        def one(r0: jax.Array) -> jax.Array:
            flat = lax.dynamic_slice_in_dim(self.rows, r0, s.item_rows, axis=0)
            flat = flat.reshape(s.lead, s.last_padded)
            if s.bitcast:
                dt = jnp.dtype(s.dtype)
                ratio = dt.itemsize // flat.dtype.itemsize
                flat = flat[:, : (s.shape[-1] * ratio)].reshape(s.lead, s.shape[-1], ratio)
                flat = lax.bitcast_convert_type(flat, dt)
            else:
                flat = flat[:, : s.shape[-1]]
            return flat.reshape(s.shape)

        return jnp.stack([one(starts[g]) for g in range(self.groups)])

    def per_row(self, name: str, item: int, grp: jax.Array) -> jax.Array:
        """The tensor of each row's model: [M, *shape] for grp [M] (one model: [*shape], which
        broadcasts the same way)."""
        st = self.stacked(name, item)
        return st[0] if self.groups == 1 else jnp.take(st, grp, axis=0)

    def matmul(self, x: jax.Array, name: str, item: int, sizes: jax.Array,
               out_dtype: Any = jnp.float32) -> jax.Array:
        """x [M, K] (rows sorted by model; sizes [G] rows each, the rest 0) @ each model's W read
        in place from the arena -> [M, N] in out_dtype (f32 accumulation, rounded once)."""
        s, starts = self._start(name, item)
        y = arena_grouped_matmul(x, self.rows, starts, sizes.astype(jnp.int32), s.last_padded,
                                 backend=self.backend, out_dtype=jnp.dtype(out_dtype).name)
        return y[:, : s.shape[-1]]

    def grouped(self, x: jax.Array, name: str, item: int, sizes: jax.Array, **fusions: Any
                ) -> jax.Array:
        """Local experts of every model: product rows sorted by (model, expert); sizes
        [G * E_loc]. fusions: `arena_grouped_matmul`'s (x_rows, swiglu, row_scale, out_rows,
        out_dtype, group_rows); with swiglu the result is [M, swiglu]."""
        s, starts = self._start(name, item)
        per_expert = s.item_rows // s.shape[0]
        offs = starts[:, None] + per_expert * jnp.arange(s.shape[0], dtype=jnp.int32)[None]
        y = arena_grouped_matmul(x, self.rows, offs.reshape(-1), sizes, s.last_padded,
                                 backend=self.backend, **fusions)
        return y if fusions.get("swiglu") else y[:, : s.shape[-1]]

    def embed(self, tokens: jax.Array, grp: jax.Array) -> jax.Array:
        """tokens [T] of models grp [T] -> [T, D] (gathers the tokens' rows only)."""
        s, starts = self._start("attn/embed", 0)
        per_tok = s.last_padded // s.row_elems
        first = jnp.take(starts, grp)
        idx = (first + tokens * per_tok)[:, None] + jnp.arange(per_tok, dtype=jnp.int32)[None]
        out = jnp.take(self.rows, idx.reshape(-1), axis=0, mode="clip")
        return out.reshape(tokens.shape[0], s.last_padded)[:, : s.shape[-1]]


def _norm_rows(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """rms_norm of x [T, ..., N] with w [N] or per-row [T, N]."""
    if w.ndim > 1 and x.ndim > w.ndim:
        w = w.reshape(w.shape[0], *([1] * (x.ndim - w.ndim)), w.shape[-1])
    return rms_norm(x, w, eps)


# ---- one lane's layer ---------------------------------------------------------------------------------


@dataclasses.dataclass
class LaneState:
    """Per-lane values carried through the layers of one step (device shard shapes)."""

    x: jax.Array  # [T, D] residual stream
    positions: jax.Array  # [T]
    row_ok: jax.Array  # [T] bool: a real query token on a KV device
    tail_len: jax.Array  # [B] (0 for empty/finished slots and on weights devices)
    inp: dict[str, jax.Array]


def _append_slots(tail_pages_l: jax.Array, tail_start: jax.Array, tok_slot: jax.Array,
                  positions: jax.Array, row_ok: jax.Array, tpp: int) -> jax.Array:
    """Flat page-slot ids [T] for the tokens' K/V (-1: skip)."""
    b = jnp.maximum(tok_slot, 0)
    i = positions - tail_start[b]
    page = jnp.take_along_axis(tail_pages_l[b], jnp.clip(i // tpp, 0, tail_pages_l.shape[1] - 1)[:, None],
                               axis=1)[:, 0]
    ok = row_ok & (i >= 0) & (page >= 0)
    return jnp.where(ok, page * tpp + i % tpp, -1)


def _combine_split(o: jax.Array, lse: jax.Array, ox: jax.Array, lsex: jax.Array, x_rows: jax.Array,
                   dev: jax.Array, total_rows: int) -> jax.Array:
    """Merges this device's tail attention (o [T, H, W], lse [T, H]) with every device's extra
    segments (ox [X*C, H, W], lsex [X*C, H] for global rows x_rows [X*C], -1 none) by a global
    log-sum-exp: returns the combined o for this device's rows."""
    t = o.shape[0]
    start = dev * t
    rows = jnp.where(x_rows >= 0, x_rows, total_rows)  # out of range: dropped
    m = jnp.full((total_rows, *lse.shape[1:]), -jnp.inf, jnp.float32)
    m = lax.dynamic_update_slice_in_dim(m, lse, start, axis=0)
    m = m.at[rows].max(lsex, mode="drop")
    m = lax.pmax(m, POOL_AXIS)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    m_own = lax.dynamic_slice_in_dim(m, start, t, axis=0)
    w = jnp.where(jnp.isneginf(lse), 0.0, jnp.exp(lse - m_own))
    mx = jnp.take(m, jnp.minimum(rows, total_rows - 1), axis=0)
    wx = jnp.where(jnp.isneginf(lsex) | (x_rows[:, None] < 0), 0.0, jnp.exp(lsex - mx))
    num = jnp.zeros((total_rows, *o.shape[1:]), jnp.float32)
    num = lax.dynamic_update_slice_in_dim(num, w[..., None] * o.astype(jnp.float32), start, axis=0)
    num = num.at[rows].add(wx[..., None] * ox.astype(jnp.float32), mode="drop")
    den = jnp.zeros((total_rows, *lse.shape[1:]), jnp.float32)
    den = lax.dynamic_update_slice_in_dim(den, w, start, axis=0)
    den = den.at[rows].add(wx, mode="drop")
    num = lax.psum(num, POOL_AXIS)
    den = lax.psum(den, POOL_AXIS)
    num_o = lax.dynamic_slice_in_dim(num, start, t, axis=0)
    den_o = lax.dynamic_slice_in_dim(den, start, t, axis=0)
    return jnp.where(den_o[..., None] > 0, num_o / jnp.where(den_o > 0, den_o, 1.0)[..., None], 0.0)


class Lane:
    """One lane's computation inside the program (closes over static shapes)."""

    def __init__(self, shape: LaneShape, geom: PageGeometry, spec: StepSpec, num_devices: int,
                 num_kv: int, weights_base: int):
        self.shape = shape
        self.cls = shape.cls
        self.cfg: ModelConfig = shape.cls.config
        self.g = shape.groups
        self.geom = geom
        self.spec = spec
        self.n = num_devices
        self.n_kv = num_kv
        self.w_base = weights_base

    def reader(self, arena: jax.Array, inp: dict[str, jax.Array], backend: str | None) -> _Reader:
        return _Reader(arena, self.cls, inp["a_base"], inp["f_base"], backend)

    # -- A-side --
    # A layer's attention is three phases so the program can write all lanes' KV at ONE point per
    # layer: every read of the arena's previous version then feeds (through the hidden states) into
    # that write, so XLA can update the arena in place. A read no later write depends on (e.g. one
    # lane's attention while another lane appends) makes XLA copy the whole arena instead.
    def attention_pre(self, rd: _Reader, st: LaneState, layer: int | jax.Array, is_kv: jax.Array
                      ) -> dict:
        """Input norm, projections, norms, rotary: the new K/V (or MLA latent) and the queries."""
        cfg, sh, inp = self.cfg, self.shape, st.inp
        t = sh.tokens
        grp = inp["tok_grp"]
        sizes = jnp.where(is_kv, inp["grp_rows"], 0)  # [G] rows of each model (sorted by model)
        eps = cfg.rms_norm_eps
        dt = st.x.dtype
        h = _norm_rows(st.x, rd.per_row("attn/layers/input_norm", layer, grp), eps)
        tail_pages = inp["tail_pages"][:, layer]
        slots = _append_slots(tail_pages, inp["tail_start"], inp["tok_slot"], st.positions,
                              st.row_ok, self.geom.tokens_per_page)
        cos, sin = rope_cos_sin(cfg, st.positions[None])
        ctx: dict[str, Any] = dict(sizes=sizes, dt=dt, tail_pages=tail_pages, slots=slots)
        if cfg.attention == AttentionKind.GQA:
            H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            bias = self.cls.has("attn/layers/bqkv")  # added in f32 before the one rounding
            qkv = rd.matmul(h, "attn/layers/wqkv", layer, sizes, jnp.float32 if bias else dt)
            if bias:
                qkv = qkv + rd.per_row("attn/layers/bqkv", layer, grp).astype(jnp.float32)
            qkv = qkv.astype(dt)
            q, k, v = qkv[:, : H * Dh], qkv[:, H * Dh:(H + K) * Dh], qkv[:, (H + K) * Dh:]
            if cfg.qk_norm == QKNorm.FULL:
                q = _norm_rows(q, rd.per_row("attn/layers/q_norm", layer, grp), eps)
                k = _norm_rows(k, rd.per_row("attn/layers/k_norm", layer, grp), eps)
            if cfg.clip_qkv is not None:
                q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
            q, k, v = q.reshape(t, H, Dh), k.reshape(t, K, Dh), v.reshape(t, K, Dh)
            if cfg.qk_norm == QKNorm.PER_HEAD:
                q = _norm_rows(q, rd.per_row("attn/layers/q_norm", layer, grp), eps)
                k = _norm_rows(k, rd.per_row("attn/layers/k_norm", layer, grp), eps)
            ctx["q"] = apply_rope(q[None], cos, sin, cfg.rope_style)[0]
            ctx["k"] = apply_rope(k[None], cos, sin, cfg.rope_style)[0]
            ctx["v"] = v
            return ctx
        H, n, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        R = cfg.kv_lora_rank
        if self.cls.has("attn/layers/wq_a"):
            bias = self.cls.has("attn/layers/bq_a")
            qa = rd.matmul(h, "attn/layers/wq_a", layer, sizes, jnp.float32 if bias else dt)
            if bias:
                qa = qa + rd.per_row("attn/layers/bq_a", layer, grp).astype(jnp.float32)
            qa = _norm_rows(qa.astype(dt), rd.per_row("attn/layers/q_a_norm", layer, grp), eps)
            q = rd.matmul(qa, "attn/layers/wq_b", layer, sizes, dt)
        else:
            q = rd.matmul(h, "attn/layers/wq", layer, sizes, dt)
        q = q.reshape(t, H, n + r)
        ctx["q_nope"] = q[..., :n]
        ctx["q_rope"] = apply_rope(q[None, ..., n:], cos, sin, cfg.rope_style)[0]
        bias = self.cls.has("attn/layers/bkv_a")
        ckv = rd.matmul(h, "attn/layers/wkv_a", layer, sizes, jnp.float32 if bias else dt)
        if bias:
            ckv = ckv + rd.per_row("attn/layers/bkv_a", layer, grp).astype(jnp.float32)
        ckv = ckv.astype(dt)
        ctx["latent"] = _norm_rows(ckv[:, :R], rd.per_row("attn/layers/kv_a_norm", layer, grp), eps)
        ctx["k_rope"] = apply_rope(ckv[None, :, None, R:], cos, sin, cfg.rope_style)[0, :, 0]
        return ctx

    def kv_write(self, arena: jax.Array, ctx: dict) -> jax.Array:
        """Appends this layer's new K/V (MLA: latent + rope key) into the pages, in place."""
        be = self.spec.backend
        if self.cfg.attention == AttentionKind.GQA:
            return kv_append(arena, ctx["slots"], ctx["k"], ctx["v"], self.geom, backend=be)
        return mla_kv_append(arena, ctx["slots"], ctx["latent"], ctx["k_rope"], self.geom, backend=be)

    def attention_post(self, rd: _Reader, arena: jax.Array, st: LaneState, layer: int | jax.Array,
                       dev: jax.Array, is_kv: jax.Array, ctx: dict, window: int | None) -> jax.Array:
        """Paged attention (+ split-KV combine), output projection, residual; returns the FFN input
        (post-attention-normed hidden states [T, D]). Reads `arena` after the layer's KV writes.
        `layer` may be traced (the host-scheduled step's programs serve every layer); `window` is
        the layer's sliding window (static; None: full attention)."""
        cfg, t, dt, sizes = self.cfg, self.shape.tokens, ctx["dt"], ctx["sizes"]
        grp = st.inp["tok_grp"]
        self.state_inp = st.inp
        kw = dict(backend=self.spec.backend, window=window)
        split = self.shape.extras > 0
        tail_pages = ctx["tail_pages"]
        if cfg.attention == AttentionKind.GQA:
            q = ctx["q"]
            o, lse = self._attend(arena, q, None, st, tail_pages, kw, split)
            if split:
                o = self._split(arena, q, None, o, lse, layer, dev, is_kv, kw)
            o = o.astype(dt).reshape(t, cfg.num_heads * cfg.head_dim)
        else:
            H, n, vd, R = cfg.num_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
            wkv_b = rd.stacked("attn/layers/wkv_b", layer)[0].reshape(R, H, n + vd)  # groups == 1
            hp = lax.Precision.HIGHEST if dt == jnp.float32 else None
            q_lat = jnp.einsum("thn,chn->thc", ctx["q_nope"], wkv_b[..., :n], precision=hp,
                               preferred_element_type=jnp.float32).astype(dt)
            o_lat, lse = self._attend(arena, q_lat, ctx["q_rope"], st, tail_pages, kw, split)
            if split:
                o_lat = self._split(arena, q_lat, ctx["q_rope"], o_lat, lse, layer, dev, is_kv, kw)
            o = jnp.einsum("thc,chv->thv", o_lat.astype(dt), wkv_b[..., n:], precision=hp,
                           preferred_element_type=jnp.float32).astype(dt).reshape(t, H * vd)
        bias = self.cls.has("attn/layers/bo")
        a = rd.matmul(o, "attn/layers/wo", layer, sizes, jnp.float32 if bias else dt)
        if bias:
            a = a + rd.per_row("attn/layers/bo", layer, grp).astype(jnp.float32)
        x = st.x + a.astype(dt)
        st.x = x
        return _norm_rows(x, rd.per_row("attn/layers/post_attn_norm", layer, grp), cfg.rms_norm_eps)

    def _attend(self, arena, q, q_rope, st: LaneState, tail_pages, kw, split: bool):
        """Tail-segment attention of this device's rows: (o [T, H, W], lse [T, H] or None)."""
        cfg, inp = self.cfg, st.inp
        sched = self.spec.attention_schedule
        mla = cfg.attention == AttentionKind.MLA
        extra = dict(kw, return_lse=True) if split else kw
        kernels = self.spec.attention_kernels
        if self.spec.decode:
            if mla:
                res = dispatch.mla_decode_attention(q, q_rope, arena, tail_pages, st.tail_len,
                                                    self.geom, scale=cfg.softmax_scale,
                                                    kernels=kernels, schedule=sched, **extra)
            else:
                res = paged_decode_attention(q, arena, tail_pages, st.tail_len, self.geom,
                                             scale=cfg.softmax_scale, schedule=sched, **extra)
        elif mla:
            res = dispatch.mla_prefill_attention(q, q_rope, arena, tail_pages, st.tail_len,
                                                 inp["cu_q"], self.geom, scale=cfg.softmax_scale,
                                                 kernels=kernels, **extra)
        else:
            res = dispatch.prefill_attention(q, arena, tail_pages, st.tail_len, inp["cu_q"],
                                             self.geom, scale=cfg.softmax_scale, kernels=kernels,
                                             one_row_decode=self.spec.one_row_decode, **extra)
        return res if split else (res, None)

    def _split(self, arena, q, q_rope, o, lse, layer, dev, is_kv, kw):
        """Adds the extra segments' partial attention (all KV devices) to o."""
        cfg, sh, inp = self.cfg, self.shape, self.state_inp
        x_rows = inp["x_rows"].reshape(-1)
        c = sh.extra_rows
        q_all = lax.all_gather(q, POOL_AXIS, tiled=True)
        qx = jnp.take(q_all, jnp.maximum(x_rows, 0), axis=0)
        pages = jnp.repeat(inp["x_pages"][:, layer], c, axis=0)
        lens = jnp.where((x_rows >= 0) & is_kv, jnp.repeat(inp["x_len"], c), 0)
        kw = dict(kw, return_lse=True)
        if cfg.attention == AttentionKind.MLA:
            r_all = lax.all_gather(q_rope, POOL_AXIS, tiled=True)
            rx = jnp.take(r_all, jnp.maximum(x_rows, 0), axis=0)
            ox, lsex = dispatch.mla_decode_attention(qx, rx, arena, pages, lens, self.geom,
                                                     scale=cfg.softmax_scale,
                                                     kernels=self.spec.attention_kernels, **kw)
        else:
            ox, lsex = paged_decode_attention(qx, arena, pages, lens, self.geom,
                                              scale=cfg.softmax_scale, **kw)
        return _combine_split(o, lse, ox, lsex, x_rows, dev, self.n * sh.tokens)

    # -- F-side --
    def ffn(self, rd: _Reader, f_rows: jax.Array, f_grp: jax.Array, f_ok: jax.Array, kind: FFNKind,
            idx: int | jax.Array, dev: jax.Array, is_w: jax.Array) -> jax.Array:
        """This device's partial FFN output [M, D] f32 for the KV devices' rows f_rows [M, D] of
        models f_grp [M] (f_ok [M]: a real token; other rows come back 0). kind / idx: the layer's
        FFN kind (static) and its index into that kind's stacked tensors (may be traced)."""
        cfg, g = self.cfg, self.g
        dt = f_rows.dtype
        if kind == FFNKind.DENSE:
            return self._tensor_parallel(rd, f_rows, f_grp, f_ok, "ffn/dense/w_gate_up",
                                         "ffn/dense/w_down", idx, is_w, self.cls.dense_local)
        # each row routed by its own model's router: one grouped matmul over the models (f32,
        # as the reference's router), then top-k on the logits
        logits = self._by_model(rd, f_rows, f_grp, f_ok, is_w,
                                lambda xs, sizes: rd.matmul(xs, "ffn/moe/router", idx, sizes))
        bias = (rd.per_row("ffn/moe/router_bias", idx, f_grp).astype(jnp.float32)
                if self.cls.has("ffn/moe/router_bias") else None)
        weights, experts = route_logits(cfg, logits, bias)
        e_loc = self.cls.experts_local
        k = cfg.top_k
        local = experts - (dev - self.w_base) * e_loc
        is_local = (local >= 0) & (local < e_loc) & is_w & f_ok[:, None]
        n_groups = g * e_loc  # (model, local expert) groups, model-major
        key = jnp.where(is_local, f_grp[:, None] * e_loc + local, n_groups).reshape(-1)
        order = jnp.argsort(key, stable=True)
        sizes = group_counts(key, n_groups)
        # permute -> grouped matmul -> unpermute with the permutations fused into the matmuls:
        # the gate/up product reads each row's token through `x_rows` and applies SwiGLU; the down
        # product scales each row by its routing weight and stores it token-major (`out_rows`),
        # so a token's k rows are summed in choice order (deterministic on GPU, as
        # `moe.unpermute_sum`) without a scatter-add. The scaled rows are stored in the model's
        # dtype and summed in f32, as the reference does (bf16: half the bytes of f32 rows)
        # A prefill chunk's rows are mostly one model's: tile for its experts' groups (rows x k
        # over the model's experts), not for the mean over every model's groups (decode keeps the
        # mean: its rows spread over the models)
        tiling = {} if self.spec.decode else {"group_rows": -(-key.shape[0] // cfg.num_experts)}
        act = rd.grouped(f_rows, "ffn/moe/w_gate_up", idx, sizes, x_rows=order // k,
                         swiglu=cfg.moe_intermediate_size, out_dtype=dt, **tiling)
        w_sorted = jnp.where(key[order] < n_groups, weights.reshape(-1)[order], 0.0)
        o = rd.grouped(act, "ffn/moe/w_down", idx, sizes, row_scale=w_sorted, out_rows=order,
                       out_dtype=dt, **tiling)
        out = o.reshape(-1, k, o.shape[-1]).astype(jnp.float32).sum(axis=1)  # [M, D] f32
        if self.cls.shared_local:
            sh = self._tensor_parallel(rd, f_rows, f_grp, f_ok, "ffn/moe/shared_gate_up",
                                       "ffn/moe/shared_down", idx, is_w, self.cls.shared_local)
            if self.cls.has("ffn/moe/shared_gate"):
                gate_w = rd.per_row("ffn/moe/shared_gate", idx, f_grp)  # [D, 1] or [M, D, 1]
                eq = "nd,do->no" if gate_w.ndim == 2 else "nd,ndo->no"
                gate = jnp.einsum(eq, f_rows, gate_w, preferred_element_type=jnp.float32)
                sh = jax.nn.sigmoid(gate.astype(dt).astype(jnp.float32)) * sh
            out = out + sh
        return out

    def _by_model(self, rd: _Reader, x: jax.Array, grp: jax.Array, ok: jax.Array, is_w: jax.Array,
                  fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
        """fn(rows sorted by model, sizes [G]) -> [M, N], put back in the rows' order. Rows that
        are not real tokens (ok False) and every row off the weights devices come back 0."""
        g = self.g
        if g == 1:  # one model: every row in one group, no sort (rows that are not tokens are 0)
            return fn(jnp.where(ok[:, None], x, 0), jnp.where(is_w, x.shape[0], 0).astype(jnp.int32)[None])
        key = jnp.where(ok, grp, g)
        order = jnp.argsort(key, stable=True)
        sizes = jnp.where(is_w, group_counts(key, g), 0)
        ys = fn(x[order], sizes)
        return jnp.zeros_like(ys).at[order].set(ys)

    def _tensor_parallel(self, rd: _Reader, x: jax.Array, grp: jax.Array, ok: jax.Array,
                         gate_up: str, down: str, idx: int, is_w: jax.Array, inter_local: int
                         ) -> jax.Array:
        """Tensor-parallel SwiGLU partial (this device's intermediate columns) -> [M, D] f32."""

        def swiglu(xs: jax.Array, sizes: jax.Array) -> jax.Array:
            h = rd.matmul(xs, gate_up, idx, sizes, x.dtype)
            a = jax.nn.silu(h[:, :inter_local]) * h[:, inter_local:2 * inter_local]
            return rd.matmul(a.astype(x.dtype), down, idx, sizes)

        return self._by_model(rd, x, grp, ok, is_w, swiglu)

    # -- step start and end --
    def live_rows(self, inp: dict[str, jax.Array], lens: jax.Array, done: jax.Array, is_kv: jax.Array
                  ) -> tuple[jax.Array, jax.Array]:
        """(row_ok [T], tail_len [B]): which query rows are real tokens this step and each slot's
        tail length (0 on finished slots and off the KV devices)."""
        if self.spec.decode:
            live = is_kv & jnp.logical_not(done)
            return live & (inp["tok_slot"] >= 0), jnp.where(live, lens, 0)
        return is_kv & (inp["tok_slot"] >= 0), jnp.where(is_kv, lens, 0)

    def sample(self, rd: _Reader, x: jax.Array, positions: jax.Array, inp: dict[str, jax.Array],
               rem: jax.Array, done: jax.Array, is_kv: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """LM head, on-device sampling and stop checks of each slot's sample row: (next token [B]
        (-1: none), valid [B], finished [B]: a stop id or its last allowed token)."""
        logits = self.head(rd, x, inp, is_kv)
        row = jnp.maximum(inp["sample_row"], 0)
        nxt = sample_tokens(logits, inp["temperature"], inp["top_k"], inp["top_p"], inp["seed"],
                            jnp.take(positions, row) + 1)
        valid = is_kv & (inp["sample_row"] >= 0) & jnp.logical_not(done)
        nxt = jnp.where(valid, nxt, -1)
        stop = jnp.any((nxt[:, None] == inp["stop_ids"]) & (inp["stop_ids"] >= 0), axis=1)
        return nxt, valid, stop | (rem <= 1)

    def head(self, rd: _Reader, x: jax.Array, inp: dict[str, jax.Array], is_kv: jax.Array
             ) -> jax.Array:
        """Logits [B, V] f32 of each slot's sample row (slots sorted by model)."""
        cfg = self.cfg
        xs = jnp.take(x, jnp.maximum(inp["sample_row"], 0), axis=0)
        h = _norm_rows(xs, rd.per_row("attn/final_norm", 0, inp["slot_grp"]), cfg.rms_norm_eps)
        return rd.matmul(h, "attn/lm_head", 0, jnp.where(is_kv, inp["grp_slots"], 0))


def next_carry(nxt: jax.Array, valid: jax.Array, fin: jax.Array, tok: jax.Array, pos: jax.Array,
               lens: jax.Array, rem: jax.Array, done: jax.Array) -> tuple[jax.Array, ...]:
    """A decode slot's carry (token, position, tail length, remaining, done) after one step that
    sampled `nxt` (valid / fin as `Lane.sample` returns them)."""
    live = jnp.logical_not(done)
    return (jnp.where(valid, nxt, tok), pos + live, lens + live, rem - live, done | (valid & fin))


# ---- the layer loop ------------------------------------------------------------------------------------

# What a layer's program text depends on, per lane: (FFN kind, sliding window (0: none)), or None
# for a lane with fewer layers. Layers of equal signature compile to the same loop body.
LayerSignature = tuple[tuple[FFNKind, int] | None, ...]


def layer_signatures(cfgs: list[ModelConfig]) -> list[LayerSignature]:
    """Each layer's signature over the lanes' configs (as deep as the deepest lane)."""
    depth = max(c.num_layers for c in cfgs)
    return [tuple((c.ffn_kinds[li], c.sliding_windows[li]) if li < c.num_layers else None for c in cfgs)
            for li in range(depth)]


def layer_segments(sigs: list[LayerSignature], max_period: int = 4) -> list[tuple[int, int, int]]:
    """Splits the layers into loops: (first layer, period, repeats) per segment, covering every
    layer in order; a segment is `repeats` copies of the `period` signatures starting at its first
    layer. Greedy: at each layer the run of equal signatures (period 1), unless a longer period
    (<= max_period) repeats at least twice and covers more layers (ties: the shorter period).
    Uniform models give one segment (period 1); a DeepSeek model with dense first layers two;
    Qwen2-MoE with every other layer dense one of period 2."""
    out, i, n = [], 0, len(sigs)
    while i < n:
        best_p, best_r = 1, 0
        for p in range(1, min(max_period, n - i) + 1):
            r = 1
            while i + (r + 1) * p <= n and sigs[i + r * p: i + (r + 1) * p] == sigs[i: i + p]:
                r += 1
            if (p == 1 or r >= 2) and r * p > best_p * best_r:
                best_p, best_r = p, r
        out.append((i, best_p, best_r))
        i += best_p * best_r
    return out


def run_layers(arena: jax.Array, states: list[LaneState], cfgs: list[ModelConfig],
               layer_fn: Callable[[jax.Array, Any, LayerSignature], jax.Array], unroll: bool = False
               ) -> jax.Array:
    """Runs `layer_fn(arena, layer, signature)` over every layer as loops (`lax.scan` per segment of
    `layer_segments`, the layer index traced), so the program's size and compile time stop
    growing with depth; a segment of one repeat is emitted straight (static layer index). The
    lanes' residual streams (`states[i].x`) are carried through the loops with the arena.
    `unroll`: every layer emitted straight instead (what the step was before the loop)."""
    sigs = layer_signatures(cfgs)
    for start, period, repeats in layer_segments(sigs):
        if repeats == 1 or unroll:
            for j in range(period * repeats):
                arena = layer_fn(arena, start + j, sigs[start + j])
            continue

        def segment(carry, i, start=start, period=period):
            arena, xs = carry
            for st, x in zip(states, xs, strict=True):
                st.x = x
            for j in range(period):
                arena = layer_fn(arena, start + i * period + j, sigs[start + j])
            return (arena, tuple(st.x for st in states)), None

        (arena, xs), _ = lax.scan(segment, (arena, tuple(st.x for st in states)),
                                  jnp.arange(repeats, dtype=jnp.int32))
        for st, x in zip(states, xs, strict=True):
            st.x = x
    return arena


# ---- the program ---------------------------------------------------------------------------------------


def lane_specs(lane: LaneShape, decode: bool) -> dict[str, P]:
    keys = ["tokens", "positions", "tok_slot", "tail_pages", "tail_start", "tail_len", "sample_row",
            "temperature", "top_k", "top_p", "seed", "remaining", "stop_ids", "a_base", "f_base",
            "grp_rows", "grp_slots", "tok_grp", "slot_grp"]
    if not decode:
        keys.append("cu_q")
    if lane.extras:
        keys += ["x_rows", "x_pages", "x_len"]
    return {k: P(POOL_AXIS) for k in keys}


class _Where(NamedTuple):
    """This device's place in the pool, traced inside shard_map: its index on the pool axis and
    whether it is a KV device / a weights device (both, colocated)."""

    dev: jax.Array
    is_kv: jax.Array
    is_w: jax.Array


# The decode loop's carry: (tokens, positions, tail lengths, remaining, done), each a tuple with
# one array per lane (tokens / positions [T], the others [B]).
_Carry = tuple[tuple[jax.Array, ...], ...]


@dataclasses.dataclass(frozen=True)
class _StepProgram:
    """What `build_step` traces for `spec`: its lanes over a pool of `n_kv` KV devices (weights
    devices from index `w_base`), their weight matmuls on `mm_backend`. The methods run inside
    shard_map, on one device's shard (module doc)."""

    spec: StepSpec
    lanes: tuple[Lane, ...]
    n_kv: int
    w_base: int
    mm_backend: str

    def body(self, arena: jax.Array, inputs: tuple[dict[str, jax.Array], ...]
             ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """The shard_map body: one step (prefill, whatever `spec.steps`), or `spec.steps` decode
        steps as a scan whose carry feeds each step's sampled tokens to the next. Returns (arena,
        per lane [K, B] tokens; K = 1 for prefill)."""
        dev = lax.axis_index(POOL_AXIS)
        at = _Where(dev, dev < self.n_kv, dev >= self.w_base)
        decode = self.spec.decode
        carry = (tuple(d["tokens"] for d in inputs), tuple(d["positions"] for d in inputs),
                 tuple(d["tail_len"] for d in inputs), tuple(d["remaining"] for d in inputs),
                 tuple(jnp.logical_not(at.is_kv) | (d["tail_len"] <= 0) if decode
                       else jnp.zeros_like(d["tail_len"], bool) for d in inputs))
        if not decode:
            arena, new = self.one_step(arena, inputs, carry, at)
            return arena, tuple(nxt[None] for nxt, _, _ in new)

        def loop(c: tuple, _: None) -> tuple:
            arena, *lane_carry = c
            arena, new = self.one_step(arena, inputs, tuple(lane_carry), at)
            with jax.named_scope("next_carry"):
                nexts = [next_carry(*sampled, *one)
                         for sampled, *one in zip(new, *lane_carry, strict=True)]
            lane_carry = tuple(tuple(parts) for parts in zip(*nexts, strict=True))
            return (arena, *lane_carry), tuple(nxt for nxt, _, _ in new)

        (arena, *_), outs = lax.scan(loop, (arena, *carry), None, length=self.spec.steps)
        return arena, outs

    def reader(self, i: int, arena: jax.Array, st: LaneState) -> _Reader:
        """Lane i's weight reader over this version of the arena."""
        return self.lanes[i].reader(arena, st.inp, self.mm_backend)

    def one_step(self, arena: jax.Array, inputs: tuple[dict[str, jax.Array], ...], carry: _Carry,
                 at: _Where) -> tuple[jax.Array, list[tuple[jax.Array, ...]]]:
        """Embeds each lane's tokens, runs every layer (`run_layers` over `layer`) and samples.
        Returns (arena, per lane `Lane.sample`'s (next token, valid, finished))."""
        toks, poss, lens, rems, dones = carry
        states: list[LaneState] = []
        # named scopes: XLA's op names (HLO dumps, profiles) say which part of the step a kernel
        # came from
        for ln, inp, tok, pos, ln_len, done in zip(self.lanes, inputs, toks, poss, lens, dones,
                                                   strict=True):
            with jax.named_scope("embed"):
                rd = ln.reader(arena, inp, self.mm_backend)
                row_ok, tail_len = ln.live_rows(inp, ln_len, done, at.is_kv)
                x = rd.embed(jnp.where(row_ok, tok, 0), inp["tok_grp"])
            states.append(LaneState(x, pos, row_ok, tail_len, inp))
        # every KV device's rows, as the weights devices see them: model of each row, real or not
        f_meta = []
        for ln, st in zip(self.lanes, states, strict=True):
            m = self.n_kv * ln.shape.tokens
            f_meta.append((lax.all_gather(st.inp["tok_grp"], POOL_AXIS, tiled=True)[:m],
                           lax.all_gather(st.row_ok, POOL_AXIS, tiled=True)[:m]))

        def layer_fn(arena: jax.Array, layer: jax.Array, sig: LayerSignature) -> jax.Array:
            return self.layer(arena, layer, sig, states, f_meta, at)

        arena = run_layers(arena, states, [ln.cfg for ln in self.lanes], layer_fn,
                           self.spec.unroll_layers)
        with jax.named_scope("sample"):
            new = [ln.sample(self.reader(i, arena, st), st.x, st.positions, st.inp, rem, done,
                             at.is_kv)
                   for i, (ln, st, rem, done) in enumerate(zip(self.lanes, states, rems, dones,
                                                               strict=True))]
        return arena, new

    def layer(self, arena: jax.Array, layer: jax.Array | int, sig: LayerSignature,
              states: list[LaneState], f_meta: list[tuple[jax.Array, jax.Array]], at: _Where
              ) -> jax.Array:
        """One layer of every lane live in it (`sig`: each lane's FFN kind and window, or None
        past its depth); `layer` may be traced (inside a scan over layers). Every live lane's
        projections read the arena's current version, then every lane's KV write happens at one
        point (in place: all earlier reads feed it), then each lane's attention + output
        projection, emitted next to the FFN of the lane before it, so with 2+ lanes
        (micro-batches) the KV devices' attention and the weights devices' experts can run at
        the same time."""
        lanes = self.lanes
        live = [i for i, one in enumerate(sig) if one is not None]
        with jax.named_scope("attention_pre"):
            ctxs = {i: lanes[i].attention_pre(self.reader(i, arena, states[i]), states[i], layer,
                                              at.is_kv) for i in live}
        # every lane's reads of this version happen before the first write (barrier) (the
        # residual streams too: XLA would otherwise re-fuse the layer-0 embedding gather into
        # the residual add after the write, reading the old arena)
        arrs = {i: {k: v for k, v in c.items() if isinstance(v, jax.Array)} for i, c in ctxs.items()}
        xs = tuple(st.x for st in states)
        arena, arrs, xs = lax.optimization_barrier((arena, arrs, xs))
        ctxs = {i: {**ctxs[i], **arrs[i]} for i in live}
        for st, x in zip(states, xs, strict=True):
            st.x = x
        for i in live:
            with jax.named_scope("kv_write"):
                arena = lanes[i].kv_write(arena, ctxs[i])
        pending: list[tuple[int, jax.Array]] = []
        for i in live:
            ln, st = lanes[i], states[i]
            with jax.named_scope("attention_post"):
                f_in = ln.attention_post(self.reader(i, arena, st), arena, st, layer, at.dev,
                                         at.is_kv, ctxs[i], sig[i][1] or None)
            with jax.named_scope("to_ffn"):
                f_rows = lax.all_gather(jnp.where(st.row_ok[:, None], f_in, 0), POOL_AXIS,
                                        tiled=True)[: self.n_kv * ln.shape.tokens]
            pending.append((i, f_rows))
            if len(pending) > 1:
                self.ffn(arena, *pending.pop(0), layer, sig, states, f_meta, at)
        while pending:
            self.ffn(arena, *pending.pop(0), layer, sig, states, f_meta, at)
        return arena

    def ffn(self, arena: jax.Array, i: int, f_rows: jax.Array, layer: jax.Array | int,
            sig: LayerSignature, states: list[LaneState],
            f_meta: list[tuple[jax.Array, jax.Array]], at: _Where) -> None:
        """Lane i's FFN of `layer` over the KV devices' rows `f_rows` [n_kv * T, D] on the weights
        devices, summed over the pool; each KV device adds its own rows to its residual stream."""
        ln, st = self.lanes[i], states[i]
        with jax.named_scope("ffn"):
            idx = jnp.asarray(ln.cfg.ffn_stack_index, jnp.int32)[layer]
            part = ln.ffn(self.reader(i, arena, st), f_rows, *f_meta[i], sig[i][0], idx, at.dev,
                          at.is_w)
        with jax.named_scope("from_ffn"):
            total = lax.psum(jnp.where(at.is_w, part, 0.0), POOL_AXIS)
            t = ln.shape.tokens
            mine = lax.dynamic_slice_in_dim(total, jnp.minimum(at.dev, self.n_kv - 1) * t, t, axis=0)
            st.x = st.x + mine.astype(st.x.dtype)


def build_step(spec: StepSpec, store: ArenaStore, platform: str) -> Callable:
    """The jitted one-program step for `spec` over `store`'s devices and models (`_StepProgram`).

    Returns ``step(arena, inputs) -> (arena, outputs)``; inputs: a tuple with one dict per lane of
    global arrays whose leading axis is (devices x per-device shape), sharded over the pool axis;
    outputs: one [N, K, B] int32 array per lane (device-major). donates: the arena.
    """
    n, n_kv = store.num_devices, store.num_kv
    w_base = store.weights_index_base
    lanes = tuple(Lane(sh, model_geometry(sh.cls.config, store.layout, platform), spec, n, n_kv,
                       w_base) for sh in spec.lanes)
    # the Pallas arena matmul on GPU (measured faster, docs/benchmarks.md); elsewhere XLA's
    # ragged_dot over sliced weights (the interpreter is too slow for whole models on CPU)
    mm_backend = spec.matmul_backend or ("gpu" if platform == "gpu" else "reference")
    program = _StepProgram(spec, lanes, n_kv, w_base, mm_backend)
    in_specs = (P(POOL_AXIS), tuple(lane_specs(sh, spec.decode) for sh in spec.lanes))
    out_specs = (P(POOL_AXIS), tuple(P(None, POOL_AXIS) for _ in spec.lanes))
    f = shard_map(program.body, store.mesh, in_specs=in_specs, out_specs=out_specs)
    # donates: the arena (KV appends write it in place)
    return jax.jit(f, donate_argnums=(0,))


def empty_lane_inputs(num_devices: int, slots: int, tokens: int, layers: int, pages: int,
                      stop_width: int, decode: bool, extras: int = 0,
                      extra_rows: int = 1) -> dict[str, np.ndarray]:
    """A lane's per-slot and per-row host inputs with no row or slot in use, [N, ...] each (shapes
    as `input_shapes`, the model-group inputs left out): token rows and slots point nowhere (-1),
    sampling is greedy, nothing remains; a prefill lane also gets `cu_q`, a lane with `extras`
    split-KV segments of `extra_rows` query rows their (empty) `x_rows` / `x_pages` / `x_len`."""
    n, b, t = num_devices, slots, tokens
    arr = {
        "tokens": np.zeros((n, t), np.int32), "positions": np.zeros((n, t), np.int32),
        "tok_slot": np.full((n, t), -1, np.int32),
        "tail_pages": np.full((n, b, layers, pages), -1, np.int32),
        "tail_start": np.zeros((n, b), np.int32), "tail_len": np.zeros((n, b), np.int32),
        "sample_row": np.full((n, b), -1, np.int32),
        "temperature": np.zeros((n, b), np.float32), "top_k": np.zeros((n, b), np.int32),
        "top_p": np.ones((n, b), np.float32), "seed": np.zeros((n, b, 2), np.uint32),
        "remaining": np.zeros((n, b), np.int32), "stop_ids": np.full((n, b, stop_width), -1, np.int32),
    }
    if not decode:
        arr["cu_q"] = np.zeros((n, b + 1), np.int32)
    if extras:
        arr["x_rows"] = np.full((n, extras, extra_rows), -1, np.int32)
        arr["x_pages"] = np.full((n, extras, layers, pages), -1, np.int32)
        arr["x_len"] = np.zeros((n, extras), np.int32)
    return arr


def input_shapes(spec: StepSpec, store: ArenaStore) -> tuple[dict[str, jax.ShapeDtypeStruct], ...]:
    """The global input arrays `build_step(spec, store)` takes, as sharded ShapeDtypeStructs (one
    dict per lane; per-device shapes as in the module docstring, stacked over the pool axis): what
    ahead-of-time compilation lowers against."""
    n = store.num_devices
    i32, f32, u32 = jnp.int32, jnp.float32, jnp.uint32
    out = []
    for ln in spec.lanes:
        b, t, p, g, L = ln.slots, ln.tokens, ln.max_pages, ln.groups, ln.cls.config.num_layers
        shapes: dict[str, tuple[tuple[int, ...], Any]] = {
            "tokens": ((t,), i32), "positions": ((t,), i32), "tok_slot": ((t,), i32),
            "tail_pages": ((b, L, p), i32), "tail_start": ((b,), i32), "tail_len": ((b,), i32),
            "sample_row": ((b,), i32), "temperature": ((b,), f32), "top_k": ((b,), i32),
            "top_p": ((b,), f32), "seed": ((b, 2), u32), "remaining": ((b,), i32),
            "stop_ids": ((b, ln.stop_width), i32), "a_base": ((g,), i32), "f_base": ((g,), i32),
            "grp_rows": ((g,), i32), "grp_slots": ((g,), i32), "tok_grp": ((t,), i32),
            "slot_grp": ((b,), i32)}
        if not spec.decode:
            shapes["cu_q"] = ((b + 1,), i32)
        if ln.extras:
            shapes |= {"x_rows": ((ln.extras, ln.extra_rows), i32),
                       "x_pages": ((ln.extras, L, p), i32), "x_len": ((ln.extras,), i32)}
        out.append({k: jax.ShapeDtypeStruct((n * sh[0], *sh[1:]), dt, sharding=store.sharding)
                    for k, (sh, dt) in shapes.items()})
    return tuple(out)


def one_model_group_inputs(store: ArenaStore, model: str, slots_per_device: list[int], tokens: int,
                           slots: int) -> dict[str, np.ndarray]:
    """The model-group inputs (a_base ... slot_grp, shapes [N, ...]) of a lane holding only
    `model`, whose first `slots_per_device[d]` slots (one query row each) are real on KV device d.
    For benchmarks and tests that build lane inputs by hand (the engine's runner builds them for
    lanes of several models)."""
    n = store.num_devices
    ma = store.models[model]
    real = np.zeros(n, np.int32)
    real[: len(slots_per_device)] = slots_per_device
    return {"a_base": np.full((n, 1), ma.base[Role.KV], np.int32),
            "f_base": np.full((n, 1), ma.base[Role.WEIGHTS], np.int32),
            "grp_rows": real[:, None].copy(), "grp_slots": real[:, None].copy(),
            "tok_grp": np.zeros((n, tokens), np.int32), "slot_grp": np.zeros((n, slots), np.int32)}


def describe(spec: StepSpec) -> dict[str, Any]:
    return {"decode": spec.decode, "steps": spec.steps,
            "lanes": [{"family": sh.cls.config.family.value, "groups": sh.groups, "slots": sh.slots,
                       "tokens": sh.tokens, "max_pages": sh.max_pages, "extras": sh.extras}
                      for sh in spec.lanes]}
