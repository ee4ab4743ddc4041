"""The host-scheduled pipeline: a decode step driven layer by layer from the host, each pool on its
own mesh, hidden states moved between the meshes with asynchronous `jax.device_put`.

This is the execution strategy for when ONE program cannot span both pools (separate meshes,
uneven device counts, separate processes); where it can, `crosspool_jax.pooled_step` (the
"lowered" strategy: one SPMD program, transfers as collectives inside it) is the faster one
(../shared/DESIGN.md measured ~300 us of host round trip per layer for a host loop). See
docs/host_pipeline.md for when to use which and for the measurements.

Split of a layer (as everywhere in the project, docs/design.md):

* KV mesh (axis ``kv``, the batch sharded over it): residual + FFN output -> input norm -> fused
  q|k|v projection -> q/k norms, clipping, rotary -> `pallas_kernels.kv_append` into the paged KV
  arena -> `pallas_kernels.paged_decode_attention` -> output projection -> residual ->
  post-attention norm. The post-attention-normed hidden states leave for the weights mesh.
* weights mesh (axis ``expert``): router (replicated), the routed experts expert-parallel (each
  device its slice of the expert axis, a grouped matmul over its local experts, empty groups
  skipped), shared experts / dense FFN tensor-parallel on the intermediate axis; one ``psum``.
  The FFN output goes back to the KV mesh, where the next layer adds it to the residual.
* after the last layer, a head call on the KV mesh: final norm, LM head, on-device sampling
  (`crosspool_jax.sampling.sample_tokens`; greedy at temperature 0) and the next token's
  embedding.

Micro-batches and the group size (the two knobs of `PipelineConfig`):

* ``micro_batches`` M: the batch of B sequences is cut into M micro-batches of b = B / M.
* ``group_size`` g (layers per host call; g divides M): the micro-batches form M / g *lanes* of g
  micro-batches each. Inside a lane, micro-batch j runs one layer behind micro-batch j - 1, so one
  host call on a pool covers g CONSECUTIVE layers -- layer l of micro-batch 0, l - 1 of
  micro-batch 1, ..., l - g + 1 of micro-batch g - 1 (a diagonal of the micro-batch x layer grid,
  the wavefront of a pipeline): its program reads g layers' weights, each applied to its own
  micro-batch, and moves the g micro-batches' hidden states in ONE transfer per direction.
  Why a diagonal: layer l + 1's attention needs layer l's FFN output, so g consecutive layers of
  ONE micro-batch can never be one call on one pool -- each layer is a round trip between the
  pools. Grouping therefore cuts host calls and transfers per (micro-batch x layer) by g: a lane
  issues one KV call, one FFN call and two transfers per tick, L ticks per decode step (plus
  g - 1 ticks of pipeline fill and drain per `decode` call, in which the calls carry inactive
  entries that write and count nothing).
* lanes overlap: with M / g >= 2 lanes the host issues lane 1's attention while lane 0's experts
  run (ping-pong), so the pools work at the same time and one lane's transfers hide under the
  other lane's compute. With one lane (g = M) the pools alternate.

Host calls per decode step: 2 * (M / g) * L (attention + FFN) + M (heads); transfers
2 * (M / g) * L. Weight reads per step grow with M (each micro-batch reads each layer's weights,
and each touches its own experts); g does not change them.

Shapes, shardings, donation, units (b = B / M micro-batch rows, b_kv = b / n_kv rows per KV
device, D hidden, g group size; "replicated" = `PartitionSpec()` on that mesh):

* KV arena: [n_kv * pages_per_device, rows_per_page, R] in the activation dtype, sharded over
  ``kv`` (each KV device its own pages; the page layout of `pallas_kernels.page_layout`: a page is
  one layer's K/V of `tokens_per_page` tokens of one sequence). Donated to every attention call
  (K/V appended in place).
* page tables: per (micro-batch, layer) [b, pages_per_seq] int32 of device-local page ids,
  sharded over ``kv`` on rows. Each sequence owns ceil(max_seq_len / tokens_per_page) pages per
  layer on the KV device of its row, fixed at construction.
* residual per micro-batch [b, D] and position [b] int32: sharded over ``kv``; never leave the KV
  mesh.
* hidden states to the weights mesh: [g, b, D], replicated on the KV mesh (an all_gather of the
  rows inside the attention call), `device_put` to replicated on the weights mesh; FFN output
  [g, b, D] replicated on the weights mesh, `device_put` back to replicated on the KV mesh (each
  KV device slices its rows). Replicated -> replicated is what jax copies device to device between
  meshes of any sizes; a sharded source or target would be staged through host memory.
* A-side weights: ordinary arrays replicated on the KV mesh, one dict per layer (q|k|v fused as
  ``wqkv`` [D, (H + 2K) * Dh]). F-side: one dict per layer on the weights mesh; routed experts
  [E_pad, D, 2I] / [E_pad, I, D] sharded over ``expert`` (E padded to a multiple of the device
  count with experts no token is routed to), shared / dense gate|up [D, 2, I_pad] and down
  [I_pad, D] sharded over ``expert`` on I (padded with zeros), router replicated.
* times in seconds; host calls and transfers counted per `decode` call (`PipelineStats`).

Supported: GQA attention (MHA / GQA / MQA: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), softmax /
group-limited / sigmoid-grouped routers, shared experts (+ gate), dense FFN layers, q/k norms,
qkv / o biases, clipping, sliding windows, tied embeddings. Not supported: MLA (DeepSeek-V2/V3)
-- `place_model` refuses it; several models in one pipeline; prefill other than teacher-forced
decode steps (`generate`); per-sequence stop checks inside a `decode` call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from crosspool_jax.config import AttentionKind, FFNKind, ModelConfig, QKNorm
from crosspool_jax.errors import CrossPoolError
from crosspool_jax.models.layers import apply_rope, linear, rms_norm, rope_cos_sin
from crosspool_jax.models.moe import route
from crosspool_jax.models.transformer import lm_head
from crosspool_jax.params import ModelWeights
from crosspool_jax.sampling import SamplingParams, sample_tokens, seed_words
from crosspool_jax.topology import EXPERT_AXIS, KV_AXIS, PoolTopology
from pallas_kernels import kv_append, paged_decode_attention
from pallas_kernels.arena_matmul import arena_grouped_matmul
from pallas_kernels.page_layout import KVSpec, PageGeometry, PoolLayout, choose_row_elems, page_geometry

Tree = dict[str, Any]


class PipelineError(CrossPoolError, ValueError):
    """A pipeline that cannot be built as asked (shapes, knobs, unsupported model)."""


def _shard_map(f: Callable, mesh: Mesh, in_specs: Any, out_specs: Any) -> Callable:
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _platform(mesh: Mesh) -> str:
    """"gpu" / "tpu" / "cpu" of the mesh's devices."""
    p = mesh.devices.flat[0].platform
    return "gpu" if p in ("gpu", "cuda", "rocm") else p


# ---- configuration ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """The knobs of the host-scheduled pipeline (module docstring).

    group_size: layers per host call (g); must divide micro_batches.
    micro_batches: M, the batch is cut into M micro-batches; M / g lanes run in ping-pong.
    tokens_per_page: tokens of one layer of one sequence per KV page.
    attention_backend: backend of the paged attention / KV append kernels (`pallas_kernels`):
      None = from the KV devices' platform ("gpu" on GPU, "tpu" on TPU, "interpret" on CPU), or
      "reference" (plain jnp) / "interpret" / "gpu" / "tpu".
    expert_backend: the routed experts' grouped matmul: "pallas" (`arena_grouped_matmul` reading
      the expert arrays in place; Triton on GPU, the interpreter elsewhere) or "xla"
      (`lax.ragged_dot`); None = "pallas" on GPU, "xla" elsewhere.
    """

    group_size: int = 1
    micro_batches: int = 1
    tokens_per_page: int = 16
    attention_backend: str | None = None
    expert_backend: str | None = None

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.micro_batches < 1:
            raise PipelineError(f"group_size and micro_batches must be >= 1, got {self}")
        if self.micro_batches % self.group_size:
            raise PipelineError(
                f"group_size {self.group_size} must divide micro_batches {self.micro_batches} "
                "(a lane is group_size micro-batches one layer apart)"
            )
        if self.tokens_per_page < 1:
            raise PipelineError(f"tokens_per_page must be >= 1, got {self.tokens_per_page}")
        if self.expert_backend not in (None, "pallas", "xla"):
            raise PipelineError(
                f"expert_backend must be 'pallas', 'xla' or None, got {self.expert_backend!r}")

    @property
    def lanes(self) -> int:
        return self.micro_batches // self.group_size


def pool_meshes(topology: PoolTopology) -> tuple[Mesh, Mesh]:
    """(KV mesh, weights mesh) of a KV+WEIGHTS split: one mesh per pool, no mesh spans both."""
    return topology.kv_mesh, topology.weights_mesh


def colocated_meshes(device: jax.Device) -> tuple[Mesh, Mesh]:
    """Both "pools" on one device (the colocated comparison run of the same programs)."""
    return Mesh(np.array([device]), (KV_AXIS,)), Mesh(np.array([device]), (EXPERT_AXIS,))


# ---- placement ----------------------------------------------------------------------------------------

# Placement kinds of F-side tensors: sharded on the expert axis (dim 0), tensor-parallel on the
# intermediate axis (gate|up [D, 2, I] on dim 2, down [I, D] on dim 0), or replicated.
_F_SPECS = {
    "router": P(),
    "router_bias": P(),
    "w_gate_up": P(EXPERT_AXIS),
    "w_down": P(EXPERT_AXIS),
    "shared_gate_up": P(None, None, EXPERT_AXIS),
    "shared_down": P(EXPERT_AXIS),
    "shared_gate": P(),
    "dense_gate_up": P(None, None, EXPERT_AXIS),
    "dense_down": P(EXPERT_AXIS),
}


@dataclasses.dataclass(frozen=True)
class PlacedModel:
    """One model's weights split over the two meshes (module docstring, "Shapes").

    attn_global: embed [V, D], final_norm [D], lm_head [D, V] (absent when tied), on the KV mesh.
    attn_layers: per layer {input_norm, post_attn_norm, wqkv, [bqkv], [q_norm, k_norm], wo, [bo]}.
    ffn_layers: per layer, MoE {router, [router_bias], w_gate_up, w_down, [shared_gate_up,
      shared_down, [shared_gate]]} or dense {dense_gate_up, dense_down}, on the weights mesh.
    """

    config: ModelConfig
    kv_mesh: Mesh
    weights_mesh: Mesh
    attn_global: Tree
    attn_layers: tuple[Tree, ...]
    ffn_layers: tuple[Tree, ...]

    @property
    def dtype(self) -> jnp.dtype:
        return self.attn_global["embed"].dtype

    @property
    def experts_local(self) -> int:
        return -(-self.config.num_experts // self.weights_mesh.size) if self.config.moe_layers else 0

    def bytes_by_device(self) -> dict[int, int]:
        """Bytes of weights resident on each device id (from the arrays' shards)."""
        out: dict[int, int] = {}
        trees = (self.attn_global, self.attn_layers, self.ffn_layers)
        for leaf in jax.tree.leaves(trees):
            for s in leaf.addressable_shards:
                out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
        return out


def _check_model(cfg: ModelConfig) -> None:
    if cfg.attention != AttentionKind.GQA:
        raise PipelineError(
            f"{cfg.family}: MLA attention is not supported by the host-scheduled pipeline "
            "(GQA / MQA / MHA models only; MLA runs on the lowered step, crosspool_jax.pooled_step)"
        )


def _pad_to(n: int, k: int) -> int:
    return -(-n // k) * k


def _host_layers(cfg: ModelConfig, weights: ModelWeights, n_w: int) -> tuple[list[Tree], list[Tree]]:
    """Per-layer host (numpy) dicts of both sides in the placed layout (fused qkv, padding)."""
    a = jax.tree.map(np.asarray, weights.attn["layers"])
    f = jax.tree.map(np.asarray, weights.ffn)
    a_layers, f_layers = [], []
    for layer in range(cfg.num_layers):
        lw = {k: v[layer] for k, v in a.items()}
        d = {"input_norm": lw["input_norm"], "post_attn_norm": lw["post_attn_norm"],
             "wqkv": np.concatenate([lw["wq"], lw["wk"], lw["wv"]], axis=1), "wo": lw["wo"]}
        if "bq" in lw:
            d["bqkv"] = np.concatenate([lw["bq"], lw["bk"], lw["bv"]])
        for k in ("q_norm", "k_norm", "bo"):
            if k in lw:
                d[k] = lw[k]
        a_layers.append(d)
        idx = cfg.ffn_stack_index[layer]
        if cfg.ffn_kinds[layer] == FFNKind.DENSE:
            gu, down = f["dense"]["w_gate_up"][idx], f["dense"]["w_down"][idx]
            f_layers.append(_tp_pair("dense", gu, down, n_w))
            continue
        m = {k: v[idx] for k, v in f["moe"].items()}
        e_pad = _pad_to(cfg.num_experts, n_w) - cfg.num_experts
        fd = {"router": m["router"],
              "w_gate_up": np.pad(m["w_gate_up"], ((0, e_pad), (0, 0), (0, 0))),
              "w_down": np.pad(m["w_down"], ((0, e_pad), (0, 0), (0, 0)))}
        if "router_bias" in m:
            fd["router_bias"] = m["router_bias"]
        if "shared_gate_up" in m:
            fd |= _tp_pair("shared", m["shared_gate_up"], m["shared_down"], n_w)
            if "shared_gate" in m:
                fd["shared_gate"] = m["shared_gate"]
        f_layers.append(fd)
    return a_layers, f_layers


def _tp_pair(prefix: str, gate_up: np.ndarray, down: np.ndarray, n_w: int) -> Tree:
    """gate|up [D, 2I] -> [D, 2, I_pad], down [I, D] -> [I_pad, D]; the padding is zeros, so the
    padded units contribute exactly 0 (silu(0) * 0)."""
    d, two_i = gate_up.shape
    inter = two_i // 2
    pad = _pad_to(inter, n_w) - inter
    gu = np.pad(gate_up.reshape(d, 2, inter), ((0, 0), (0, 0), (0, pad)))
    return {f"{prefix}_gate_up": gu, f"{prefix}_down": np.pad(down, ((0, pad), (0, 0)))}


def place_model(cfg: ModelConfig, weights: ModelWeights, kv_mesh: Mesh, weights_mesh: Mesh) -> PlacedModel:
    """Places ordinary weights (`crosspool_jax.params` layout) on the two meshes.

    The arrays pass through host memory (numpy) once; meant for small and medium models. For
    benchmark-size random models use `place_random_model` (generated on the devices).
    """
    _check_model(cfg)
    a_layers, f_layers = _host_layers(cfg, weights, weights_mesh.size)
    rep_kv = NamedSharding(kv_mesh, P())
    attn_global = {k: jax.device_put(np.asarray(weights.attn[k]), rep_kv)
                   for k in ("embed", "final_norm", "lm_head") if k in weights.attn}
    a = tuple({k: jax.device_put(v, rep_kv) for k, v in d.items()} for d in a_layers)
    f = tuple({k: jax.device_put(v, NamedSharding(weights_mesh, _F_SPECS[k])) for k, v in d.items()}
              for d in f_layers)
    return PlacedModel(cfg, kv_mesh, weights_mesh, attn_global, a, f)


@functools.cache
def _random_fn(shape: tuple[int, ...], dtype: Any, kind: str, scale: float, pad: tuple[tuple[int, int], ...],
               sharding: NamedSharding) -> Callable:
    """Jitted generator of one tensor straight into its sharding: ones, zeros or N(0, scale^2), then
    zero padding (`pad`)."""

    def gen(key: jax.Array) -> jax.Array:
        if kind == "ones":
            x = jnp.ones(shape, dtype)
        elif kind == "zeros":
            x = jnp.zeros(shape, dtype)
        else:
            x = (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)
        return jnp.pad(x, pad) if any(p for pp in pad for p in pp) else x

    return jax.jit(gen, out_shardings=sharding)


def place_random_model(cfg: ModelConfig, kv_mesh: Mesh, weights_mesh: Mesh, dtype: Any = jnp.bfloat16,
                       seed: int = 0, scale: float = 0.02) -> PlacedModel:
    """A model of `cfg`'s real shapes with random weights generated on the devices (no host copy):
    norms 1, router biases 0, everything else N(0, scale^2). Same seed, same weights, whatever the
    meshes (the colocated comparison run uses this)."""
    _check_model(cfg)
    dtype = jnp.dtype(dtype)
    n_w = weights_mesh.size
    D, H, K, Dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    counter = iter(range(1 << 30))

    def put(shape: tuple[int, ...], mesh: Mesh, spec: P, kind: str = "normal",
            pad: tuple[tuple[int, int], ...] | None = None, dt: Any = dtype) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(seed), next(counter))
        pad = pad or tuple((0, 0) for _ in shape)
        return _random_fn(shape, jnp.dtype(dt), kind, scale, pad, NamedSharding(mesh, spec))(key)

    rep = P()
    g: Tree = {"embed": put((cfg.vocab_size, D), kv_mesh, rep), "final_norm": put((D,), kv_mesh, rep, "ones")}
    if not cfg.tie_word_embeddings:
        g["lm_head"] = put((D, cfg.vocab_size), kv_mesh, rep)
    a_layers, f_layers = [], []

    def tp(prefix: str, inter: int) -> Tree:
        pad = _pad_to(inter, n_w) - inter
        return {f"{prefix}_gate_up": put((D, 2, inter), weights_mesh, _F_SPECS[f"{prefix}_gate_up"],
                                         pad=((0, 0), (0, 0), (0, pad))),
                f"{prefix}_down": put((inter, D), weights_mesh, _F_SPECS[f"{prefix}_down"],
                                      pad=((0, pad), (0, 0)))}

    for layer in range(cfg.num_layers):
        a: Tree = {"input_norm": put((D,), kv_mesh, rep, "ones"),
                   "post_attn_norm": put((D,), kv_mesh, rep, "ones"),
                   "wqkv": put((D, (H + 2 * K) * Dh), kv_mesh, rep), "wo": put((H * Dh, D), kv_mesh, rep)}
        if cfg.qkv_bias:
            a["bqkv"] = put(((H + 2 * K) * Dh,), kv_mesh, rep)
        if cfg.qk_norm == QKNorm.PER_HEAD:
            a |= {"q_norm": put((Dh,), kv_mesh, rep, "ones"), "k_norm": put((Dh,), kv_mesh, rep, "ones")}
        elif cfg.qk_norm == QKNorm.FULL:
            a |= {"q_norm": put((H * Dh,), kv_mesh, rep, "ones"),
                  "k_norm": put((K * Dh,), kv_mesh, rep, "ones")}
        if cfg.o_bias:
            a["bo"] = put((D,), kv_mesh, rep)
        a_layers.append(a)
        if cfg.ffn_kinds[layer] == FFNKind.DENSE:
            f_layers.append(tp("dense", cfg.dense_intermediate_size))
            continue
        E, Im = cfg.num_experts, cfg.moe_intermediate_size
        e_pad = _pad_to(E, n_w) - E
        f: Tree = {"router": put((D, E), weights_mesh, rep),
                   "w_gate_up": put((E, D, 2 * Im), weights_mesh, _F_SPECS["w_gate_up"],
                                    pad=((0, e_pad), (0, 0), (0, 0))),
                   "w_down": put((E, Im, D), weights_mesh, _F_SPECS["w_down"],
                                 pad=((0, e_pad), (0, 0), (0, 0)))}
        if cfg.router_bias:
            f["router_bias"] = put((E,), weights_mesh, rep, "zeros", dt=jnp.float32)
        if cfg.shared_intermediate_size:
            f |= tp("shared", cfg.shared_intermediate_size)
            if cfg.shared_expert_gate:
                f["shared_gate"] = put((D, 1), weights_mesh, rep)
        f_layers.append(f)
    return PlacedModel(cfg, kv_mesh, weights_mesh, g, tuple(a_layers), tuple(f_layers))


# ---- per-device bodies ----------------------------------------------------------------------------------


def _attention_pre(cfg: ModelConfig, w: Tree, x: jax.Array, pos: jax.Array):
    """Input norm, fused q|k|v, q/k norms, clipping, rotary. x [n, D], pos [n] ->
    q [n, H, Dh], k / v [n, K, Dh] in x's dtype (the math of `models.attention.gqa_qkv`)."""
    n = x.shape[0]
    H, K, Dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    h = rms_norm(x, w["input_norm"], cfg.rms_norm_eps)
    qkv = linear(h, w["wqkv"], w.get("bqkv"))
    q, k, v = qkv[:, : H * Dh], qkv[:, H * Dh: (H + K) * Dh], qkv[:, (H + K) * Dh:]
    if cfg.qk_norm == QKNorm.FULL:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q, k, v = q.reshape(n, H, Dh), k.reshape(n, K, Dh), v.reshape(n, K, Dh)
    if cfg.qk_norm == QKNorm.PER_HEAD:
        q = rms_norm(q, w["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, w["k_norm"], cfg.rms_norm_eps)
    cos, sin = rope_cos_sin(cfg, pos[None])
    q = apply_rope(q[None], cos, sin, cfg.rope_style)[0]
    return q, apply_rope(k[None], cos, sin, cfg.rope_style)[0], v


def expert_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array, backend: str) -> jax.Array:
    """Rows of x sorted by group; w [G, K, N]; sizes [G] -> [M, N] f32 (rows past sum(sizes): 0).

    backend: "xla" (`lax.ragged_dot`) or a Pallas backend of `arena_grouped_matmul` ("gpu",
    "interpret"), which reads w in place through a row view of it."""
    if backend == "xla":
        return lax.ragged_dot(x.astype(w.dtype), w, sizes, preferred_element_type=jnp.float32)
    g, k, n = w.shape
    r = math.gcd(n, 128)  # row width of the in-place view: the largest power of two <= 128 dividing N
    rows = w.reshape(g * k * n // r, r)  # a row-major bitcast, no copy
    offsets = jnp.arange(g, dtype=jnp.int32) * (k * n // r)
    return arena_grouped_matmul(x, rows, offsets, sizes, n, backend=backend)


def _gated_partial(x: jax.Array, gate_up: jax.Array, down: jax.Array) -> jax.Array:
    """This device's tensor-parallel SwiGLU partial: gate|up [D, 2, I_loc], down [I_loc, D] -> [n, D]
    f32 (`models.layers.gated_mlp` on this device's intermediate units, before the psum)."""
    d, _, i_loc = gate_up.shape
    h = linear(x, gate_up.reshape(d, 2 * i_loc))
    a = jax.nn.silu(h[:, :i_loc]) * h[:, i_loc:]
    return jnp.einsum("ni,id->nd", a.astype(down.dtype), down, preferred_element_type=jnp.float32)


def _ffn_partials(cfg: ModelConfig, w: Tree, x: jax.Array, dev: jax.Array, e_loc: int, backend: str
                  ) -> jax.Array:
    """One layer's FFN on this weights device, before the psum: [2, n, D] f32 = (routed experts
    or dense MLP, shared experts or 0). x [n, D] (replicated)."""
    if "dense_gate_up" in w:
        part = _gated_partial(x, w["dense_gate_up"], w["dense_down"])
        return jnp.stack([part, jnp.zeros_like(part)])
    n = x.shape[0]
    k = cfg.top_k
    weights, experts = route(cfg, w["router"], w.get("router_bias"), x)
    local = experts.reshape(-1) - dev * e_loc
    key = jnp.where((local >= 0) & (local < e_loc), local, e_loc)  # e_loc: not on this device
    order = jnp.argsort(key, stable=True)
    sizes = jnp.bincount(key, length=e_loc + 1)[:e_loc].astype(jnp.int32)
    tok = order // k
    xs = x[tok].astype(w["w_gate_up"].dtype)
    inter = cfg.moe_intermediate_size
    h = expert_matmul(xs, w["w_gate_up"], sizes, backend)
    a = (jax.nn.silu(h[:, :inter]) * h[:, inter:]).astype(w["w_down"].dtype)
    o = expert_matmul(a, w["w_down"], sizes, backend)
    o = o * jnp.where(key[order] < e_loc, weights.reshape(-1)[order], 0.0)[:, None]
    routed = jnp.zeros((n, x.shape[1]), jnp.float32).at[tok].add(o)
    shared = (_gated_partial(x, w["shared_gate_up"], w["shared_down"]) if "shared_gate_up" in w
              else jnp.zeros_like(routed))
    return jnp.stack([routed, shared])


def _ffn_combine(w: Tree, x: jax.Array, tot: jax.Array) -> jax.Array:
    """[2, n, D] f32 summed over the pool -> the layer's FFN output [n, D] in x's dtype
    (`models.moe.moe_ffn`'s order of casts and adds)."""
    dt = x.dtype
    out = tot[0].astype(dt)
    if "shared_gate_up" in w:
        shared = tot[1].astype(dt)
        if "shared_gate" in w:
            gate = jax.nn.sigmoid(linear(x, w["shared_gate"]).astype(jnp.float32))
            shared = (gate * shared.astype(jnp.float32)).astype(dt)
        out = out + shared
    return out


# ---- pages ------------------------------------------------------------------------------------------------


def _geometry(cfg: ModelConfig, dtype: jnp.dtype, tokens_per_page: int, platform: str) -> PageGeometry:
    spec = KVSpec.gqa(cfg.num_kv_heads, cfg.head_dim)
    r = choose_row_elems([spec], platform)
    chunks = 2 * cfg.num_kv_heads * -(-cfg.head_dim // r)
    layout = PoolLayout(tokens_per_page * chunks * r * dtype.itemsize, str(dtype), r)
    return page_geometry(spec, layout, token_align=1, platform=platform)


@dataclasses.dataclass(frozen=True)
class PipelineStats:
    """What one `decode` call cost the host. Counts are per call; times in seconds."""

    steps: int
    ticks: int  # scheduler ticks (all lanes advance one layer per tick)
    attention_calls: int
    ffn_calls: int
    head_calls: int  # includes the first embedding of each micro-batch
    transfers: int  # device_put between the meshes
    dispatch_s: float  # host time to issue everything
    wall_s: float  # until the tokens are on the host

    @property
    def host_calls_per_step(self) -> float:
        return (self.attention_calls + self.ffn_calls + self.head_calls) / self.steps

    @property
    def transfers_per_step(self) -> float:
        return self.transfers / self.steps


@dataclasses.dataclass
class _MicroBatch:
    """Device-resident state of one micro-batch (KV mesh, rows sharded over ``kv``)."""

    res: jax.Array  # [b, D] residual stream (or the embedding of the next token)
    pos: jax.Array  # [b] int32 position of the token being processed
    tables: tuple[jax.Array, ...]  # per layer [b, pages_per_seq] int32
    forced: jax.Array  # [steps, b] int32: input of the next step if >= 0, else the sampled token
    samp: tuple[jax.Array, ...]  # temperature [b], top_k [b], top_p [b], seed [b, 2]
    out: list[jax.Array]  # sampled tokens [b] per step


class HostPipeline:
    """Decode steps of a batch of `batch` sequences of one model, host-scheduled over two meshes.

    model: a `PlacedModel` (its meshes are the pools). config: `PipelineConfig`. max_seq_len: the
    tokens each sequence may hold (pages are fixed per sequence at construction). page_seed: the
    page ids are a random permutation of each KV device's pages (None: in order), so the kernels
    really read through the page table.
    record: keep `trace`, a list of (stage, device ids, fully replicated) for every hidden-state
    array that crosses the meshes (for tests).
    """

    def __init__(self, model: PlacedModel, config: PipelineConfig, batch: int, max_seq_len: int,
                 page_seed: int | None = 0, record: bool = False):
        cfg = model.config
        self.model, self.config, self.cfg = model, config, cfg
        self.kv_mesh, self.w_mesh = model.kv_mesh, model.weights_mesh
        n_kv = self.kv_mesh.size
        M = config.micro_batches
        if batch % M or (batch // M) % n_kv:
            raise PipelineError(f"batch {batch} must split into {M} micro-batches of a multiple of "
                                f"{n_kv} (KV devices) sequences")
        self.batch, self.b, self.b_kv = batch, batch // M, batch // M // n_kv
        self.max_seq_len = max_seq_len
        self.platform = _platform(self.kv_mesh)
        self.geom = _geometry(cfg, jnp.dtype(model.dtype), config.tokens_per_page, self.platform)
        if config.attention_backend is not None:
            self.attn_backend = config.attention_backend
        else:
            self.attn_backend = {"gpu": "gpu", "tpu": "tpu"}.get(self.platform, "interpret")
        w_platform = _platform(self.w_mesh)
        expert = config.expert_backend or ("pallas" if w_platform == "gpu" else "xla")
        # the grouped matmul's backend: XLA's ragged_dot, or the Pallas kernel (Triton on GPU)
        self.expert_backend = "xla" if expert == "xla" else ("gpu" if w_platform == "gpu" else "interpret")
        self.e_loc = model.experts_local
        self.pages_per_seq = -(-max_seq_len // self.geom.tokens_per_page)
        L = cfg.num_layers
        self.pages_per_device = (batch // n_kv) * L * self.pages_per_seq
        self._kv = NamedSharding(self.kv_mesh, P(KV_AXIS))
        self._kv_rep = NamedSharding(self.kv_mesh, P())
        self._w_rep = NamedSharding(self.w_mesh, P())
        shape = (n_kv * self.pages_per_device, self.geom.rows_per_page, self.geom.row_elems)
        self.arena = jax.jit(lambda: jnp.zeros(shape, model.dtype), out_shardings=self._kv)()
        self.tables = self._page_tables(page_seed)  # [micro-batch][layer] -> [b, pages_per_seq]
        self.record = record
        self.trace: list[tuple[str, frozenset[int], bool]] = []
        self.last_stats: PipelineStats | None = None
        self._consts: dict[Any, jax.Array] = {}
        self._kv_progs: dict[tuple, Callable] = {}
        self._ffn_progs: dict[tuple, Callable] = {}

    # -- pages --
    def _page_tables(self, seed: int | None) -> list[tuple[jax.Array, ...]]:
        """Sequence row r of micro-batch j lives on KV device r // b_kv; there it owns pages
        perm[((j * b_kv + r % b_kv) * L + layer) * pages_per_seq + p] (device-local ids)."""
        L, pps, n_kv = self.cfg.num_layers, self.pages_per_seq, self.kv_mesh.size
        rng = np.random.default_rng(seed)
        n = self.pages_per_device
        perms = [rng.permutation(n) if seed is not None else np.arange(n) for _ in range(n_kv)]
        out = []
        for j in range(self.config.micro_batches):
            per_layer = []
            for layer in range(L):
                t = np.zeros((self.b, pps), np.int32)
                for r in range(self.b):
                    d, q = r // self.b_kv, j * self.b_kv + r % self.b_kv
                    base = (q * L + layer) * pps
                    t[r] = perms[d][base: base + pps]
                per_layer.append(jax.device_put(t, self._kv))
            out.append(tuple(per_layer))
        return out

    def fill_kv_random(self, seed: int = 0, scale: float = 1.0) -> None:
        """Every KV page ~ N(0, scale^2) (benchmarks: a long context without a prefill; decode
        time does not depend on the values)."""
        shape, dt = self.arena.shape, self.arena.dtype
        self.arena = jax.jit(lambda k: (jax.random.normal(k, shape, jnp.float32) * scale).astype(dt),
                             out_shardings=self._kv)(jax.random.key(seed))

    def kv_bytes_per_device(self) -> int:
        geom = self.geom
        return self.pages_per_device * geom.rows_per_page * geom.row_elems * self.arena.dtype.itemsize

    # -- programs --
    def _const(self, value: Any, sharding: NamedSharding, dtype: Any) -> jax.Array:
        """A small device array, uploaded once per distinct value."""
        key = (np.asarray(value, dtype).tobytes(), np.shape(value), str(dtype), sharding)
        if key not in self._consts:
            self._consts[key] = jax.device_put(np.asarray(value, dtype), sharding)
        return self._consts[key]

    def _kv_prog(self, windows: tuple[int, ...]) -> Callable:
        """The attention call of one lane tick: g entries (micro-batch, layer) on the KV mesh.

        args: arena [donated], res (g x [b, D], kv-sharded), back [g, b, D] replicated (the lane's
        last FFN output), pos (g x [b]), tables (g x [b, pages]), weights (g layer dicts), active
        [g] bool, use_back [g] bool. Returns (arena, res' (g x [b, D]), hidden [g, b, D] replicated).
        Inactive entries append nothing (slots -1) and attend to nothing (length 0).
        """
        if windows in self._kv_progs:
            return self._kv_progs[windows]
        cfg, geom, be, g = self.cfg, self.geom, self.attn_backend, len(windows)
        tpp, pps = geom.tokens_per_page, self.pages_per_seq

        def body(arena, res, back, pos, tables, weights, active, use_back):
            dev = lax.axis_index(KV_AXIS)
            n = res[0].shape[0]
            xs, qkvs, slots = [], [], []
            for i in range(g):
                bk = lax.dynamic_slice_in_dim(back[i], dev * n, n, axis=0)
                x = jnp.where(use_back[i], res[i] + bk, res[i])
                xs.append(x)
                qkvs.append(_attention_pre(cfg, weights[i], x, pos[i]))
                idx = jnp.clip(pos[i] // tpp, 0, pps - 1)[:, None]
                page = jnp.take_along_axis(tables[i], idx, axis=1)[:, 0]
                slots.append(jnp.where(active[i], page * tpp + pos[i] % tpp, -1))
            # all appends first, then all reads of the final arena: the arena is updated in place
            for i in range(g):
                arena = kv_append(arena, slots[i], qkvs[i][1], qkvs[i][2], geom, backend=be)
            outs, hidden = [], []
            for i in range(g):
                lengths = jnp.where(active[i], pos[i] + 1, 0)
                o = paged_decode_attention(qkvs[i][0], arena, tables[i], lengths, geom,
                                           scale=cfg.softmax_scale, window=windows[i] or None, backend=be)
                a = linear(o.reshape(n, -1), weights[i]["wo"], weights[i].get("bo"))
                r = xs[i] + a
                outs.append(r)
                hidden.append(rms_norm(r, weights[i]["post_attn_norm"], cfg.rms_norm_eps))
            h = lax.all_gather(jnp.stack(hidden), KV_AXIS, axis=1, tiled=True)
            return arena, tuple(outs), h

        kv, rep = P(KV_AXIS), P()
        in_specs = (kv, (kv,) * g, rep, (kv,) * g, (kv,) * g, rep, rep, rep)
        f = _shard_map(body, self.kv_mesh, in_specs, (kv, (kv,) * g, rep))
        # donates: the arena (K/V appended in place)
        prog = jax.jit(f, donate_argnums=(0,))
        self._kv_progs[windows] = prog
        return prog

    def _ffn_prog(self, kinds: tuple[tuple[str, ...], ...]) -> Callable:
        """The FFN call of one lane tick on the weights mesh: hidden [g, b, D] replicated and g
        layer dicts -> FFN outputs [g, b, D] replicated (one psum of [g, 2, b, D] f32)."""
        if kinds in self._ffn_progs:
            return self._ffn_progs[kinds]
        cfg, e_loc, be = self.cfg, self.e_loc, self.expert_backend

        def body(h, weights):
            dev = lax.axis_index(EXPERT_AXIS)
            parts = jnp.stack([_ffn_partials(cfg, weights[i], h[i], dev, e_loc, be)
                               for i in range(len(kinds))])
            tot = lax.psum(parts, EXPERT_AXIS)
            return jnp.stack([_ffn_combine(weights[i], h[i], tot[i]) for i in range(len(kinds))])

        w_specs = tuple({k: _F_SPECS[k] for k in names} for names in kinds)
        prog = jax.jit(_shard_map(body, self.w_mesh, (P(), w_specs), P()))
        self._ffn_progs[kinds] = prog
        return prog

    @functools.cached_property
    def _embed_prog(self) -> Callable:
        """tokens [b] (kv-sharded) -> embeddings [b, D]."""
        f = _shard_map(lambda emb, t: emb[t], self.kv_mesh, (P(), P(KV_AXIS)), P(KV_AXIS))
        return jax.jit(f)

    @functools.cached_property
    def _head_prog(self) -> Callable:
        """End of a decode step for one micro-batch: args res [b, D], back [g, b, D] replicated,
        row (scalar: this micro-batch's row of back), pos [b], forced [steps, b], step (scalar),
        sampling arrays, global A-side weights. Returns (sampled token [b], embedding of the
        next input token [b, D], pos + 1)."""
        cfg = self.cfg

        def body(res, back, row, pos, forced, step, temp, top_k, top_p, seed, glob):
            dev = lax.axis_index(KV_AXIS)
            n = res.shape[0]
            bk = lax.dynamic_slice(back, (row, dev * n, 0), (1, n, back.shape[2]))[0]
            logits = lm_head(cfg, glob, res + bk)
            tok = sample_tokens(logits, temp, top_k, top_p, seed, positions=pos + 1)
            f = lax.dynamic_index_in_dim(forced, step, axis=0, keepdims=False)
            nxt = jnp.where(f >= 0, f, tok)
            return tok, glob["embed"][nxt], pos + 1

        kv, rep = P(KV_AXIS), P()
        in_specs = (kv, rep, rep, kv, P(None, KV_AXIS), rep, kv, kv, kv, kv, rep)
        return jax.jit(_shard_map(body, self.kv_mesh, in_specs, (kv, kv, kv)))

    def describe(self) -> dict[str, Any]:
        """What runs, for logs and stats: the strategy, its knobs, the pools' devices, backends."""
        c = self.config
        return {"strategy": "host-scheduled", "micro_batches": c.micro_batches, "group_size": c.group_size,
                "lanes": c.lanes, "batch": self.batch, "max_seq_len": self.max_seq_len,
                "kv_devices": [d.id for d in self.kv_mesh.devices.flat],
                "weights_devices": [d.id for d in self.w_mesh.devices.flat],
                "tokens_per_page": self.geom.tokens_per_page, "attention_backend": self.attn_backend,
                "expert_backend": self.expert_backend}

    def attention_program_text(self, layers: Sequence[int] | None = None) -> str:
        """The optimised HLO of the attention call of one lane tick (entries at `layers`, default
        0 .. g - 1), compiled for this pipeline's shapes: what to search for copies of the arena."""
        g, b, D = self.config.group_size, self.b, self.cfg.hidden_size
        layers = list(range(g)) if layers is None else list(layers)
        if len(layers) != g:
            raise PipelineError(f"need {g} layers, got {layers}")
        res = tuple(jax.device_put(np.zeros((b, D), self.model.dtype), self._kv) for _ in layers)
        pos = tuple(jax.device_put(np.zeros(b, np.int32), self._kv) for _ in layers)
        back = jax.device_put(np.zeros((g, b, D), self.model.dtype), self._kv_rep)
        flags = jax.device_put(np.ones(g, np.bool_), self._kv_rep)
        prog = self._kv_prog(tuple(self.cfg.sliding_windows[layer] for layer in layers))
        lowered = prog.lower(self.arena, res, back, pos, tuple(self.tables[0][layer] for layer in layers),
                             tuple(self.model.attn_layers[layer] for layer in layers), flags, flags)
        return lowered.compile().as_text()

    def arena_copies(self, layers: Sequence[int] | None = None) -> int:
        """Copies of the arena (one device's shard, 3-D or as flat rows) in `attention_program_text`:
        0 when K/V are appended in place."""
        text = self.attention_program_text(layers)
        n, rpp, r = self.pages_per_device, self.geom.rows_per_page, self.geom.row_elems
        dt = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}[str(self.arena.dtype)]
        shapes = (f"{dt}[{n},{rpp},{r}]", f"{dt}[{n * rpp},{r}]")
        return sum(1 for line in text.splitlines()
                   if (" copy(" in line or "copy-start(" in line) and any(s in line for s in shapes))

    def _note(self, stage: str, x: jax.Array) -> None:
        if self.record:
            self.trace.append((stage, frozenset(d.id for d in x.sharding.device_set),
                               bool(x.sharding.is_fully_replicated)))

    # -- the scheduler --
    def decode(self, tokens: Any, positions: Any, steps: int, *, forced: Any = None,
               sampling: Sequence[SamplingParams] | None = None) -> np.ndarray:
        """Runs `steps` decode steps of the whole batch; returns the sampled tokens [steps, B] int32.

        tokens [B]: the input token of each sequence at step 0, at positions [B] (its KV for
        positions [0, positions) must already be in the pages: earlier `decode` calls or
        `fill_kv_random`). Step s appends the K/V of position positions + s and samples the token
        of position positions + s + 1. forced [steps, B] (optional): where >= 0, the input of
        step s + 1 is forced[s] instead of the sampled token (teacher forcing: prompts).
        sampling: per sequence (default greedy). Nothing is synchronised with the host until the
        end: every call and transfer is dispatched asynchronously.
        """
        B, M, b, L = self.batch, self.config.micro_batches, self.b, self.cfg.num_layers
        g = self.config.group_size
        tokens = np.asarray(tokens, np.int32).reshape(B)
        positions = np.asarray(positions, np.int32).reshape(B)
        if steps < 1:
            raise PipelineError(f"steps must be >= 1, got {steps}")
        if int(positions.max()) + steps > self.max_seq_len or int(positions.min()) < 0:
            raise PipelineError(f"positions + steps exceed max_seq_len {self.max_seq_len}")
        forced_np = np.full((steps, B), -1, np.int32) if forced is None else np.asarray(forced, np.int32)
        if forced_np.shape != (steps, B):
            raise PipelineError(f"forced must be [steps, batch] = {(steps, B)}, got {forced_np.shape}")
        sampling = list(sampling) if sampling is not None else [SamplingParams()] * B
        samp_np = (np.array([s.temperature for s in sampling], np.float32),
                   np.array([s.top_k for s in sampling], np.int32),
                   np.array([s.top_p for s in sampling], np.float32),
                   np.array([seed_words(s.seed) for s in sampling], np.uint32))
        t0 = time.perf_counter()
        glob = self.model.attn_global
        mbs = []
        n_head = 0
        for j in range(M):
            rows = slice(j * b, (j + 1) * b)
            tok = jax.device_put(tokens[rows], self._kv)
            mbs.append(_MicroBatch(
                res=self._embed_prog(glob["embed"], tok), pos=jax.device_put(positions[rows], self._kv),
                tables=self.tables[j],
                forced=jax.device_put(forced_np[:, rows], NamedSharding(self.kv_mesh, P(None, KV_AXIS))),
                samp=tuple(jax.device_put(a[rows], self._kv) for a in samp_np), out=[]))
            n_head += 1
        zeros_back = self._const(np.zeros((g, b, self.cfg.hidden_size)), self._kv_rep, self.model.dtype)
        lanes = [list(range(i * g, (i + 1) * g)) for i in range(self.config.lanes)]
        back = [zeros_back] * len(lanes)
        total = steps * L  # layer stages per micro-batch in this call
        n_attn = n_ffn = n_put = ticks = 0
        a_layers, f_layers = self.model.attn_layers, self.model.ffn_layers
        for t in range(total + g):
            ticks += 1
            for li, lane in enumerate(lanes):
                # heads: a micro-batch whose last layer's FFN came back in the previous tick
                for jj, m in enumerate(lane):
                    s = t - jj
                    if 0 < s <= total and s % L == 0:
                        mb = mbs[m]
                        tok, mb.res, mb.pos = self._head_prog(
                            mb.res, back[li], self._const(jj, self._kv_rep, np.int32), mb.pos, mb.forced,
                            self._const(s // L - 1, self._kv_rep, np.int32), *mb.samp, glob)
                        mb.out.append(tok)
                        n_head += 1
                stages = [t - jj for jj in range(g)]
                active = [0 <= s < total for s in stages]
                if not any(active):
                    continue
                layers = [s % L if a else 0 for s, a in zip(stages, active, strict=True)]
                use_back = [a and s % L != 0 for s, a in zip(stages, active, strict=True)]
                lane_mbs = [mbs[m] for m in lane]
                prog = self._kv_prog(tuple(self.cfg.sliding_windows[layer] for layer in layers))
                self.arena, res, hidden = prog(
                    self.arena, tuple(mb.res for mb in lane_mbs), back[li], tuple(mb.pos for mb in lane_mbs),
                    tuple(mb.tables[layer] for mb, layer in zip(lane_mbs, layers, strict=True)),
                    tuple(a_layers[layer] for layer in layers),
                    self._const(active, self._kv_rep, np.bool_),
                    self._const(use_back, self._kv_rep, np.bool_))
                n_attn += 1
                for mb, r, a in zip(lane_mbs, res, active, strict=True):
                    if a:
                        mb.res = r
                self._note("attention out", hidden)
                h_w = jax.device_put(hidden, self._w_rep)
                self._note("to weights", h_w)
                f_w = tuple(f_layers[layer] for layer in layers)
                ffn_out = self._ffn_prog(tuple(tuple(sorted(d)) for d in f_w))(h_w, f_w)
                n_ffn += 1
                self._note("ffn out", ffn_out)
                back[li] = jax.device_put(ffn_out, self._kv_rep)
                self._note("to kv", back[li])
                n_put += 2
        dispatch = time.perf_counter() - t0
        out = jax.device_get([mb.out for mb in mbs])
        wall = time.perf_counter() - t0
        self.last_stats = PipelineStats(steps, ticks, n_attn, n_ffn, n_head, n_put, dispatch, wall)
        return np.concatenate([np.stack(o) for o in out], axis=1).astype(np.int32)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sequence[SamplingParams] | None = None) -> list[list[int]]:
        """Each of the `batch` prompts from position 0, fed by teacher-forced decode steps, then
        `max_new_tokens` sampled tokens (greedy by default) per prompt. Returns those tokens."""
        if len(prompts) != self.batch or min(len(p) for p in prompts) < 1:
            raise PipelineError(f"need {self.batch} non-empty prompts, got {len(prompts)}")
        lens = [len(p) for p in prompts]
        steps = max(lens) - 1 + max_new_tokens
        forced = np.full((steps, self.batch), -1, np.int32)
        for i, p in enumerate(prompts):
            forced[: len(p) - 1, i] = p[1:]
        out = self.decode([p[0] for p in prompts], np.zeros(self.batch, np.int32), steps, forced=forced,
                          sampling=sampling)
        return [out[n - 1: n - 1 + max_new_tokens, i].tolist() for i, n in enumerate(lens)]
