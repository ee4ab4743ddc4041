"""The one-program step: a batch mixing requests of several models, over both pools, as ONE XLA program.

`build_step(spec, store)` returns a jitted function ``step(arena, inputs) -> (arena, tokens)`` that
runs SPMD (shard_map) over the global mesh (KV devices first, then weights devices). Every device
runs the same program on its own arena shard (crosspool_jax/arena.py), and the role decides what
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
then the LM head on the sampled rows, on-device sampling (`crosspool_jax.sampling`) and stop
checks; a decode program runs ``spec.steps`` tokens per call (control lowering: one host call per
K tokens).

Split-KV across KV devices: a request whose KV does not fit one device has its older tokens in
"extra" segments on other KV devices. Its queries are all-gathered, each device computes the
partial attention of the segments it holds (with the log-sum-exp), and a pmax / psum softmax
combine merges them, so one request can use the KV of the whole pool.

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
    stop_ids [B, S] int32 (-1 pad); extras: x_rows [X, C] int32 (global query rows, -1 pad),
    x_pages [X, L, P] int32, x_len [X] int32.
Output per lane: tokens [K, B] int32 (-1: no token). The arena is donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from crosspool_jax.arena import ArenaStore, ModelArena, shard_map
from crosspool_jax.config import AttentionKind, FFNKind, ModelConfig, QKNorm
from crosspool_jax.models.layers import apply_rope, rms_norm, rope_cos_sin
from crosspool_jax.models.moe import route
from crosspool_jax.sampling import sample_tokens
from crosspool_jax.topology import POOL_AXIS
from pallas_kernels import (
    kv_append,
    mla_kv_append,
    paged_decode_attention,
    paged_mla_decode_attention,
    paged_mla_prefill_attention,
    paged_prefill_attention,
)
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
    """Static shape of one lane (a model's slots, or half of them with two micro-batches)."""

    model: str
    slots: int  # B per KV device
    tokens: int  # T per KV device (decode: == slots, row b is slot b's token)
    max_pages: int  # P
    extras: int = 0  # X per device (0: no split request in this call)
    extra_rows: int = 1  # C query rows per extra segment
    stop_width: int = 1  # S


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything that shapes the compiled program (a new spec compiles a new program)."""

    lanes: tuple[LaneShape, ...]
    decode: bool  # True: one token per slot, `steps` tokens per call; False: one prefill chunk
    steps: int = 1
    backend: str | None = None  # attention kernels' backend (None: from the platform)
    attention_schedule: str = "split"
    matmul_backend: str | None = None  # arena matmul backend (None: the Pallas kernel on GPU,
    # "reference" = XLA's ragged_dot over sliced weights elsewhere)


# ---- reading the arena ------------------------------------------------------------------------------


class _Reader:
    """Reads a model's tensors from one device's flat arena rows [rows, R]."""

    def __init__(self, arena: jax.Array, ma: ModelArena, backend: str | None):
        self.rows = arena.reshape(-1, arena.shape[-1])
        self.ma = ma
        self.backend = backend

    def array(self, name: str, item: int = 0) -> jax.Array:
        """A small tensor by static slice (norms, biases, router, wkv_b)."""
        s = self.ma.slot(name)
        r0 = s.item_row(item)
        flat = self.rows[r0:r0 + s.item_rows].reshape(s.lead, s.last_padded)
        if s.bitcast:
            dt = jnp.dtype(s.dtype)
            ratio = dt.itemsize // flat.dtype.itemsize
            flat = flat[:, : (s.shape[-1] * ratio)].reshape(s.lead, s.shape[-1], ratio)
            flat = lax.bitcast_convert_type(flat, dt)
        else:
            flat = flat[:, : s.shape[-1]]
        return flat.reshape(s.shape)

    def matmul(self, x: jax.Array, name: str, item: int, n_valid: jax.Array) -> jax.Array:
        """x [M, K] @ W (in place in the arena) for the first n_valid rows -> [M, N] f32."""
        s = self.ma.slot(name)
        off = jnp.asarray([s.item_row(item)], jnp.int32)
        y = arena_grouped_matmul(x, self.rows, off, jnp.reshape(n_valid, (1,)).astype(jnp.int32),
                                 s.last_padded, backend=self.backend)
        return y[:, : s.shape[-1]]

    def grouped(self, x: jax.Array, name: str, item: int, sizes: jax.Array) -> jax.Array:
        """Local experts: x rows sorted by expert; sizes [E_loc] -> [M, N] f32."""
        s = self.ma.slot(name)
        per_expert = s.item_rows // s.shape[0]
        offs = s.item_row(item) + per_expert * jnp.arange(s.shape[0], dtype=jnp.int32)
        y = arena_grouped_matmul(x, self.rows, offs, sizes, s.last_padded, backend=self.backend)
        return y[:, : s.shape[-1]]

    def embed(self, tokens: jax.Array) -> jax.Array:
        """tokens [T] -> [T, D] (gathers the tokens' rows only)."""
        s = self.ma.slot("attn/embed")
        per_tok = s.last_padded // s.row_elems
        idx = s.row + tokens[:, None] * per_tok + jnp.arange(per_tok, dtype=jnp.int32)[None]
        out = jnp.take(self.rows, idx.reshape(-1), axis=0, mode="clip")
        return out.reshape(tokens.shape[0], s.last_padded)[:, : s.shape[-1]]


# ---- one lane's layer ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _LaneState:
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


class _Lane:
    """One lane's computation inside the program (closes over static shapes)."""

    def __init__(self, shape: LaneShape, ma: ModelArena, geom: PageGeometry, spec: StepSpec,
                 num_devices: int, weights_base: int):
        self.shape = shape
        self.ma = ma
        self.cfg: ModelConfig = ma.config
        self.geom = geom
        self.spec = spec
        self.n = num_devices
        self.w_base = weights_base

    # -- A-side --
    # A layer's attention is three phases so the program can write all lanes' KV at ONE point per
    # layer: every read of the arena's previous version then feeds (through the hidden states) into
    # that write, so XLA can update the arena in place. A read no later write depends on (e.g. one
    # lane's attention while another lane appends) makes XLA copy the whole arena instead.
    def attention_pre(self, rd: _Reader, st: _LaneState, layer: int, is_kv: jax.Array) -> dict:
        """Input norm, projections, norms, rotary: the new K/V (or MLA latent) and the queries."""
        cfg, sh, inp = self.cfg, self.shape, st.inp
        t = sh.tokens
        n_act = jnp.where(is_kv, t, 0)
        dt = st.x.dtype
        h = rms_norm(st.x, rd.array("attn/layers/input_norm", layer), cfg.rms_norm_eps)
        tail_pages = inp["tail_pages"][:, layer]
        slots = _append_slots(tail_pages, inp["tail_start"], inp["tok_slot"], st.positions,
                              st.row_ok, self.geom.tokens_per_page)
        cos, sin = rope_cos_sin(cfg, st.positions[None])
        ctx: dict[str, Any] = dict(n_act=n_act, dt=dt, tail_pages=tail_pages, slots=slots)
        if cfg.attention == AttentionKind.GQA:
            H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            qkv = rd.matmul(h, "attn/layers/wqkv", layer, n_act)
            if self.ma.has("attn/layers/bqkv"):
                qkv = qkv + rd.array("attn/layers/bqkv", layer).astype(jnp.float32)
            qkv = qkv.astype(dt)
            q, k, v = qkv[:, : H * Dh], qkv[:, H * Dh:(H + K) * Dh], qkv[:, (H + K) * Dh:]
            if cfg.qk_norm == QKNorm.FULL:
                q = rms_norm(q, rd.array("attn/layers/q_norm", layer), cfg.rms_norm_eps)
                k = rms_norm(k, rd.array("attn/layers/k_norm", layer), cfg.rms_norm_eps)
            if cfg.clip_qkv is not None:
                q, k, v = (jnp.clip(a, -cfg.clip_qkv, cfg.clip_qkv) for a in (q, k, v))
            q, k, v = q.reshape(t, H, Dh), k.reshape(t, K, Dh), v.reshape(t, K, Dh)
            if cfg.qk_norm == QKNorm.PER_HEAD:
                q = rms_norm(q, rd.array("attn/layers/q_norm", layer), cfg.rms_norm_eps)
                k = rms_norm(k, rd.array("attn/layers/k_norm", layer), cfg.rms_norm_eps)
            ctx["q"] = apply_rope(q[None], cos, sin, cfg.rope_style)[0]
            ctx["k"] = apply_rope(k[None], cos, sin, cfg.rope_style)[0]
            ctx["v"] = v
            return ctx
        H, n, r = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        R = cfg.kv_lora_rank
        if self.ma.has("attn/layers/wq_a"):
            qa = rd.matmul(h, "attn/layers/wq_a", layer, n_act)
            if self.ma.has("attn/layers/bq_a"):
                qa = qa + rd.array("attn/layers/bq_a", layer).astype(jnp.float32)
            qa = rms_norm(qa.astype(dt), rd.array("attn/layers/q_a_norm", layer), cfg.rms_norm_eps)
            q = rd.matmul(qa, "attn/layers/wq_b", layer, n_act).astype(dt)
        else:
            q = rd.matmul(h, "attn/layers/wq", layer, n_act).astype(dt)
        q = q.reshape(t, H, n + r)
        ctx["q_nope"] = q[..., :n]
        ctx["q_rope"] = apply_rope(q[None, ..., n:], cos, sin, cfg.rope_style)[0]
        ckv = rd.matmul(h, "attn/layers/wkv_a", layer, n_act)
        if self.ma.has("attn/layers/bkv_a"):
            ckv = ckv + rd.array("attn/layers/bkv_a", layer).astype(jnp.float32)
        ckv = ckv.astype(dt)
        ctx["latent"] = rms_norm(ckv[:, :R], rd.array("attn/layers/kv_a_norm", layer), cfg.rms_norm_eps)
        ctx["k_rope"] = apply_rope(ckv[None, :, None, R:], cos, sin, cfg.rope_style)[0, :, 0]
        return ctx

    def kv_write(self, arena: jax.Array, ctx: dict) -> jax.Array:
        """Appends this layer's new K/V (MLA: latent + rope key) into the pages, in place."""
        be = self.spec.backend
        if self.cfg.attention == AttentionKind.GQA:
            return kv_append(arena, ctx["slots"], ctx["k"], ctx["v"], self.geom, backend=be)
        return mla_kv_append(arena, ctx["slots"], ctx["latent"], ctx["k_rope"], self.geom, backend=be)

    def attention_post(self, rd: _Reader, arena: jax.Array, st: _LaneState, layer: int,
                       dev: jax.Array, is_kv: jax.Array, ctx: dict) -> jax.Array:
        """Paged attention (+ split-KV combine), output projection, residual; returns the FFN input
        (post-attention-normed hidden states [T, D]). Reads `arena` after the layer's KV writes."""
        cfg, t, dt, n_act = self.cfg, self.shape.tokens, ctx["dt"], ctx["n_act"]
        self.state_inp = st.inp
        kw = dict(backend=self.spec.backend, window=cfg.sliding_windows[layer] or None)
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
            wkv_b = rd.array("attn/layers/wkv_b", layer).reshape(R, H, n + vd)
            hp = lax.Precision.HIGHEST if dt == jnp.float32 else None
            q_lat = jnp.einsum("thn,chn->thc", ctx["q_nope"], wkv_b[..., :n], precision=hp,
                               preferred_element_type=jnp.float32).astype(dt)
            o_lat, lse = self._attend(arena, q_lat, ctx["q_rope"], st, tail_pages, kw, split)
            if split:
                o_lat = self._split(arena, q_lat, ctx["q_rope"], o_lat, lse, layer, dev, is_kv, kw)
            o = jnp.einsum("thc,chv->thv", o_lat.astype(dt), wkv_b[..., n:], precision=hp,
                           preferred_element_type=jnp.float32).astype(dt).reshape(t, H * vd)
        a = rd.matmul(o, "attn/layers/wo", layer, n_act)
        if self.ma.has("attn/layers/bo"):
            a = a + rd.array("attn/layers/bo", layer).astype(jnp.float32)
        x = st.x + a.astype(dt)
        st.x = x
        return rms_norm(x, rd.array("attn/layers/post_attn_norm", layer), cfg.rms_norm_eps)

    def _attend(self, arena, q, q_rope, st: _LaneState, tail_pages, kw, split: bool):
        """Tail-segment attention of this device's rows: (o [T, H, W], lse [T, H] or None)."""
        cfg, inp = self.cfg, st.inp
        sched = self.spec.attention_schedule
        mla = cfg.attention == AttentionKind.MLA
        extra = dict(kw, return_lse=True) if split else kw
        if self.spec.decode:
            if mla:
                res = paged_mla_decode_attention(q, q_rope, arena, tail_pages, st.tail_len, self.geom,
                                                 scale=cfg.softmax_scale, schedule=sched, **extra)
            else:
                res = paged_decode_attention(q, arena, tail_pages, st.tail_len, self.geom,
                                             scale=cfg.softmax_scale, schedule=sched, **extra)
        else:
            if mla:
                res = paged_mla_prefill_attention(q, q_rope, arena, tail_pages, st.tail_len,
                                                  inp["cu_q"], self.geom, scale=cfg.softmax_scale,
                                                  **extra)
            else:
                res = paged_prefill_attention(q, arena, tail_pages, st.tail_len, inp["cu_q"],
                                              self.geom, scale=cfg.softmax_scale, **extra)
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
            ox, lsex = paged_mla_decode_attention(qx, rx, arena, pages, lens, self.geom,
                                                  scale=cfg.softmax_scale, **kw)
        else:
            ox, lsex = paged_decode_attention(qx, arena, pages, lens, self.geom,
                                              scale=cfg.softmax_scale, **kw)
        return _combine_split(o, lse, ox, lsex, x_rows, dev, self.n * sh.tokens)

    # -- F-side --
    def ffn(self, rd: _Reader, f_rows: jax.Array, layer: int, dev: jax.Array, is_w: jax.Array
            ) -> jax.Array:
        """This device's partial FFN output [M, D] f32 for the KV devices' rows f_rows [M, D]."""
        cfg = self.cfg
        m_rows = f_rows.shape[0]
        n_act = jnp.where(is_w, m_rows, 0)
        idx = cfg.ffn_stack_index[layer]
        dt = f_rows.dtype
        if cfg.ffn_kinds[layer] == FFNKind.DENSE:
            return self._gated(rd, f_rows, "ffn/dense", idx, n_act, self.ma.dense_local)
        router = rd.array("ffn/moe/router", idx)
        bias = rd.array("ffn/moe/router_bias", idx) if self.ma.has("ffn/moe/router_bias") else None
        weights, experts = route(cfg, router, bias, f_rows)
        e_loc = self.ma.experts_local
        k = cfg.top_k
        j = dev - self.w_base
        local = experts - j * e_loc
        is_local = (local >= 0) & (local < e_loc) & is_w
        key = jnp.where(is_local, local, e_loc).reshape(-1)
        order = jnp.argsort(key, stable=True)
        sizes = jnp.bincount(key, length=e_loc + 1)[:e_loc].astype(jnp.int32)
        tok = order // k
        xs = f_rows[tok]
        inter = cfg.moe_intermediate_size
        hgu = rd.grouped(xs, "ffn/moe/w_gate_up", idx, sizes)
        act = (jax.nn.silu(hgu[:, :inter]) * hgu[:, inter:2 * inter]).astype(dt)
        o = rd.grouped(act, "ffn/moe/w_down", idx, sizes)
        w_sorted = jnp.where(key[order] < e_loc, weights.reshape(-1)[order], 0.0)
        out = jnp.zeros((m_rows, cfg.hidden_size), jnp.float32).at[tok].add(o * w_sorted[:, None])
        if self.ma.shared_local:
            sh = self._gated(rd, f_rows, "ffn/moe/shared", idx, n_act, self.ma.shared_local)
            if self.ma.has("ffn/moe/shared_gate"):
                g = jnp.einsum("nd,do->no", f_rows, rd.array("ffn/moe/shared_gate", idx),
                               preferred_element_type=jnp.float32)
                sh = jax.nn.sigmoid(g.astype(dt).astype(jnp.float32)) * sh
            out = out + sh
        return out

    def _gated(self, rd: _Reader, x: jax.Array, prefix: str, idx: int, n_act: jax.Array,
               inter_local: int) -> jax.Array:
        """Tensor-parallel SwiGLU partial: this device's intermediate columns -> [M, D] f32."""
        h = rd.matmul(x, f"{prefix}_gate_up" if prefix.endswith("shared") else f"{prefix}/w_gate_up",
                      idx, n_act).astype(x.dtype)
        a = jax.nn.silu(h[:, :inter_local]) * h[:, inter_local:2 * inter_local]
        down = f"{prefix}_down" if prefix.endswith("shared") else f"{prefix}/w_down"
        return rd.matmul(a.astype(x.dtype), down, idx, n_act)

    # -- head --
    def head(self, rd: _Reader, x: jax.Array, sample_row: jax.Array, is_kv: jax.Array) -> jax.Array:
        cfg = self.cfg
        xs = jnp.take(x, jnp.maximum(sample_row, 0), axis=0)
        h = rms_norm(xs, rd.array("attn/final_norm"), cfg.rms_norm_eps)
        return rd.matmul(h, "attn/lm_head", 0, jnp.where(is_kv, xs.shape[0], 0))


# ---- the program ---------------------------------------------------------------------------------------


def _lane_specs(lane: LaneShape, decode: bool) -> dict[str, P]:
    keys = ["tokens", "positions", "tok_slot", "tail_pages", "tail_start", "tail_len", "sample_row",
            "temperature", "top_k", "top_p", "seed", "remaining", "stop_ids"]
    if not decode:
        keys.append("cu_q")
    if lane.extras:
        keys += ["x_rows", "x_pages", "x_len"]
    return {k: P(POOL_AXIS) for k in keys}


def build_step(spec: StepSpec, store: ArenaStore, platform: str) -> Callable:
    """The jitted one-program step for `spec` over `store`'s devices and models.

    Returns ``step(arena, inputs) -> (arena, outputs)``; inputs: a tuple with one dict per lane of
    global arrays whose leading axis is (devices x per-device shape), sharded over the pool axis;
    outputs: one [N, K, B] int32 array per lane (device-major). donates: the arena.
    """
    n, n_kv = store.num_devices, store.num_kv
    w_base = store.weights_index_base
    lanes = []
    for sh in spec.lanes:
        ma = store.models[sh.model]
        lanes.append(_Lane(sh, ma, model_geometry(ma.config, store.layout, platform), spec, n, w_base))
    ksteps = spec.steps if spec.decode else 1
    # the Pallas arena matmul on GPU (measured faster, docs/benchmarks.md); elsewhere XLA's
    # ragged_dot over sliced weights (the interpreter is too slow for whole models on CPU)
    mm_backend = spec.matmul_backend or ("gpu" if platform == "gpu" else "reference")
    if not spec.decode and ksteps != 1:
        raise ValueError("a prefill program runs one step")

    def body(arena: jax.Array, inputs: tuple[dict[str, jax.Array], ...]):
        dev = lax.axis_index(POOL_AXIS)
        is_kv = dev < n_kv
        is_w = dev >= w_base

        def one_step(arena, carry):
            toks, poss, lens, rems, dones = carry
            states: list[_LaneState] = []
            for ln, inp, tok, pos, ln_len, done in zip(lanes, inputs, toks, poss, lens, dones,
                                                       strict=True):
                rd = _Reader(arena, ln.ma, mm_backend)
                if spec.decode:
                    row_ok = is_kv & (inp["tok_slot"] >= 0) & jnp.logical_not(done)
                    tail_len = jnp.where(is_kv & jnp.logical_not(done), ln_len, 0)
                else:
                    row_ok = is_kv & (inp["tok_slot"] >= 0)
                    tail_len = jnp.where(is_kv, ln_len, 0)
                x = rd.embed(jnp.where(row_ok, tok, 0))
                states.append(_LaneState(x, pos, row_ok, tail_len, inp))
            # Per layer: every lane's projections (reads of the arena's current version), then
            # every lane's KV write at one point (in place: all earlier reads feed it), then each
            # lane's attention + output projection, emitted next to the FFN of the lane before it
            # (software pipelining), so with 2+ lanes (micro-batches) the KV devices' attention and
            # the weights devices' experts can run at the same time.
            pending: list[tuple[int, int, jax.Array]] = []

            def run_ffn(i: int, layer: int, f_rows: jax.Array) -> None:
                ln, st = lanes[i], states[i]
                part = ln.ffn(_Reader(arena, ln.ma, mm_backend), f_rows, layer, dev, is_w)
                total = lax.psum(jnp.where(is_w, part, 0.0), POOL_AXIS)
                t = ln.shape.tokens
                mine = lax.dynamic_slice_in_dim(total, jnp.minimum(dev, n_kv - 1) * t, t, axis=0)
                st.x = st.x + mine.astype(st.x.dtype)

            max_layers = max(ln.cfg.num_layers for ln in lanes)
            for layer in range(max_layers):
                while pending:  # the previous layer's FFNs feed this layer's projections
                    run_ffn(*pending.pop(0))
                live = [i for i, ln in enumerate(lanes) if layer < ln.cfg.num_layers]
                ctxs = {i: lanes[i].attention_pre(_Reader(arena, lanes[i].ma, mm_backend), states[i],
                                                  layer, is_kv) for i in live}
                # every lane's reads of this version happen before the first write (barrier)
                # (the residual streams too: XLA would otherwise re-fuse the layer-0 embedding
                # gather into the residual add after the write, reading the old arena)
                arrs = {i: {k: v for k, v in c.items() if isinstance(v, jax.Array)} for i, c in ctxs.items()}
                xs = tuple(st.x for st in states)
                arena, arrs, xs = lax.optimization_barrier((arena, arrs, xs))
                ctxs = {i: {**ctxs[i], **arrs[i]} for i in live}
                for st, x in zip(states, xs, strict=True):
                    st.x = x
                for i in live:
                    arena = lanes[i].kv_write(arena, ctxs[i])
                for i in live:
                    ln, st = lanes[i], states[i]
                    f_in = ln.attention_post(_Reader(arena, ln.ma, mm_backend), arena, st, layer, dev,
                                             is_kv, ctxs[i])
                    f_rows = lax.all_gather(jnp.where(st.row_ok[:, None], f_in, 0), POOL_AXIS,
                                            tiled=True)[: n_kv * ln.shape.tokens]
                    pending.append((i, layer, f_rows))
                    if len(pending) > 1:
                        run_ffn(*pending.pop(0))
            while pending:
                run_ffn(*pending.pop(0))
            new = []
            for ln, st, rem, done in zip(lanes, states, rems, dones, strict=True):
                inp = st.inp
                rd = _Reader(arena, ln.ma, mm_backend)
                logits = ln.head(rd, st.x, inp["sample_row"], is_kv)
                row = jnp.maximum(inp["sample_row"], 0)
                spos = jnp.take(st.positions, row) + 1
                nxt = sample_tokens(logits, inp["temperature"], inp["top_k"], inp["top_p"],
                                    inp["seed"], spos)
                valid = is_kv & (inp["sample_row"] >= 0) & jnp.logical_not(done)
                nxt = jnp.where(valid, nxt, -1)
                stop = jnp.any((nxt[:, None] == inp["stop_ids"]) & (inp["stop_ids"] >= 0), axis=1)
                new.append((nxt, valid, stop | (rem <= 1)))
            return arena, states, new

        toks0 = tuple(d["tokens"] for d in inputs)
        poss0 = tuple(d["positions"] for d in inputs)
        lens0 = tuple(d["tail_len"] for d in inputs)
        rems0 = tuple(d["remaining"] for d in inputs)
        dones0 = tuple(jnp.logical_not(is_kv) | (d["tail_len"] <= 0) if spec.decode
                       else jnp.zeros_like(d["tail_len"], bool) for d in inputs)
        if not spec.decode:
            arena, _, new = one_step(arena, (toks0, poss0, lens0, rems0, dones0))
            return arena, tuple(nxt[None] for nxt, _, _ in new)

        def loop(carry, _):
            arena, toks, poss, lens, rems, dones = carry
            arena, _, new = one_step(arena, (toks, poss, lens, rems, dones))
            toks2, poss2, lens2, rems2, dones2, outs = [], [], [], [], [], []
            for (nxt, valid, fin), tok, pos, ln_len, rem, done in zip(new, toks, poss, lens, rems,
                                                                      dones, strict=True):
                live = jnp.logical_not(done)
                toks2.append(jnp.where(valid, nxt, tok))
                poss2.append(pos + live)
                lens2.append(ln_len + live)
                rems2.append(rem - live)
                dones2.append(done | (valid & fin))
                outs.append(nxt)
            return (arena, tuple(toks2), tuple(poss2), tuple(lens2), tuple(rems2), tuple(dones2)), \
                tuple(outs)

        (arena, *_), outs = lax.scan(loop, (arena, toks0, poss0, lens0, rems0, dones0), None,
                                     length=ksteps)
        return arena, outs

    in_specs = (P(POOL_AXIS), tuple(_lane_specs(sh, spec.decode) for sh in spec.lanes))
    out_specs = (P(POOL_AXIS), tuple(P(None, POOL_AXIS) for _ in spec.lanes))
    f = shard_map(body, store.mesh, in_specs=in_specs, out_specs=out_specs)
    # donates: the arena (KV appends write it in place)
    return jax.jit(f, donate_argnums=(0,))


def describe(spec: StepSpec) -> dict[str, Any]:
    return {"decode": spec.decode, "steps": spec.steps,
            "lanes": [dataclasses.asdict(sh) for sh in spec.lanes]}
