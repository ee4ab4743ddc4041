"""`pallas_kernels.mla_decode_mgpu` (Mosaic GPU MLA decode) on this CPU-only machine.

* Under Mosaic GPU's interpreter (its 3 warpgroups run as threads; TMA, barriers and shared
  memory simulated; shared memory starts as NaN), one case with its race detector on, against
  `paged_mla_decode_attention_reference`: NaN-poisoned arenas (every unwritten row), shuffled
  page tables with -1 past each sequence, the lengths 0, 1, T-1, T, T+1 and several pages in one
  call, 2 head blocks and a padded one, several KV splits, blocks that start inside a page,
  window + soft cap, R = 128 with the rope key narrower than a row (its row padding NaN, not
  read), DeepSeek's geometry in 64- and 128-element rows, the wide value buffer, bf16 and f16,
  and the log-sum-exp.
* Cross-lowered to Mosaic GPU for an abstract H200 at DeepSeek-V3's decode shape (B = 32,
  H = 128, latent 512 + rope 64, 64 tokens per page, 8192-token tables): the Pallas -> Mosaic
  GPU lowering, layout inference and the shared-memory check run here; only ptxas needs the chip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
from kvcase import edge_lengths, make_case, page_bytes_for, rel_err, tol
from mgpu_check import lowered_for_h200, races_detected

from pallas_kernels import attention_core
from pallas_kernels import mla_decode_mgpu as mgpu
from pallas_kernels.decode import paged_mla_decode_attention_reference
from pallas_kernels.mla_decode_mgpu import paged_mla_decode_attention_mgpu
from pallas_kernels.page_layout import KVSpec, PoolLayout, page_geometry

S = jax.ShapeDtypeStruct


@pytest.fixture
def race_detection(monkeypatch):
    """The kernel's interpret backend with the race detector on (fresh traces)."""
    with races_detected(monkeypatch, mgpu._mla_decode_mgpu):
        yield


def _run_case(seed: int, lat: int, rope: int, r: int, t_pp: int, heads: int, dtype: str,
              **kw):
    """Interpreted kernel vs the reference on one NaN-poisoned case of edge lengths. Where the
    rope key is narrower than a row, the rest of its row (zero padding, which the kernel skips:
    `mgpu.rope_cols`) is NaN too."""
    rng = np.random.default_rng(seed)
    spec = KVSpec.mla(lat, rope)
    case = make_case(rng, spec, edge_lengths(t_pp), dtype=dtype, row_elems=r,
                     page_bytes=page_bytes_for(spec, r, dtype, t_pp))
    assert case.geom.tokens_per_page == t_pp
    arena = case.arena
    if 0 < rope < r:
        rope_rows = slice(case.geom.head_chunks * t_pp, (case.geom.head_chunks + 1) * t_pp)
        arena = arena.at[:, rope_rows, rope:].set(jnp.nan)
    b = len(edge_lengths(t_pp))
    ql = jnp.asarray(rng.standard_normal((b, heads, lat)), jnp.dtype(dtype))
    qr = jnp.asarray(rng.standard_normal((b, heads, rope)), jnp.dtype(dtype))
    args = (ql, qr, arena, case.table, case.lens)
    masks = {k: v for k, v in kw.items() if k in ("window", "soft_cap")}
    ref, ref_lse = jax.jit(functools.partial(  # one compile, not one per op
        paged_mla_decode_attention_reference, geom=case.geom, scale=0.1, return_lse=True,
        **masks))(*args)
    out, lse = paged_mla_decode_attention_mgpu(*args, case.geom, scale=0.1, backend="interpret",
                                               return_lse=True, **kw)
    assert out.shape == ql.shape and out.dtype == ql.dtype and lse.shape == (b, heads)
    assert rel_err(out, ref) < tol(dtype), kw
    assert float(jnp.abs(out[0].astype(jnp.float32)).max()) == 0.0  # length 0: exactly 0
    lse, ref_lse = np.asarray(lse), np.asarray(ref_lse)
    assert np.all(np.isneginf(lse[0])) and np.all(np.isfinite(lse[1:]))
    np.testing.assert_allclose(lse[1:], ref_lse[1:], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("lookahead", "wide_values"), [(False, False), (True, False),
                                                        (False, True)])
def test_interpreted_with_race_detector(race_detection, lookahead, wide_values):
    # 2 head blocks (H = 128), 2 stages, 16-token blocks in 32-token pages (every other block
    # starts mid-page); lengths 0, 1, 31, 32, 33, 131; both schedules of warpgroup 0, and the
    # wide value buffer (8 tokens a TMA box)
    _run_case(0, 128, 64, 64, 32, 128, "bfloat16", block_t=16, stages=2, num_splits=1,
              lookahead=lookahead, wide_values=wide_values)
    assert not interpret_pallas_call.get_races().races_found


@pytest.mark.parametrize(("lat", "rope", "r", "t_pp", "heads", "dtype", "kw"), [
    # 16 heads padded to a block of 64; a 20-token window (its first block partly masked) and
    # a soft cap; 2 KV splits of the window's range (16-token blocks: the default)
    (128, 64, 64, 16, 16, "bfloat16", {"window": 20, "soft_cap": 5.0, "num_splits": 2}),
    # R = 128: 2 latent chunks + a rope chunk half padding (loaded 64 columns wide); f16; 2 KV
    # splits (the second one empty for the short sequences)
    (256, 64, 128, 32, 64, "float16", {"num_splits": 2}),
    # a 32-wide rope key in 128-element rows at 16-token blocks: its chunk loaded 32 wide
    (256, 32, 128, 16, 64, "bfloat16", {}),
    # no rope key: no rope buffers
    (128, 0, 64, 16, 16, "bfloat16", {}),
    # DeepSeek in the engine's 128-element rows: 4 latent chunks of 128 + the rope key's 64
    # columns; the default 64-token blocks, 2 stages, in order
    (512, 64, 128, 64, 64, "bfloat16", {}),
    # wide values: DeepSeek at R = 64 (P @ V as 192 + 256 + 64 columns) and at R = 128 (128 +
    # 256 + 128); a window, a soft cap and 2 splits
    (512, 64, 64, 64, 64, "bfloat16", {"wide_values": True}),
    (512, 64, 128, 64, 64, "bfloat16", {"wide_values": True}),
    (128, 64, 64, 16, 16, "bfloat16", {"wide_values": True, "window": 20, "soft_cap": 5.0,
                                       "num_splits": 2}),
    # DeepSeek's latent 512 + rope 64 (9 chunks) in 64-token pages: the default 64-token blocks,
    # 2 stages, in order
    (512, 64, 64, 64, 64, "bfloat16", {}),
    # 3 latent chunks (1 for warpgroup 0 by default), and 2 of them for it
    (192, 64, 64, 16, 16, "bfloat16", {}),
    (192, 64, 64, 16, 16, "bfloat16", {"wg0_chunks": 2, "num_splits": 2}),
    # in order with 4 stages and a window; DeepSeek's geometry with 32-token blocks, 4 stages
    # and the lookahead (the default before 2026-12-08)
    (128, 64, 64, 16, 16, "bfloat16", {"lookahead": False, "window": 20}),
    (512, 64, 64, 64, 64, "bfloat16", {"block_t": 32, "num_splits": 2}),
])
def test_interpreted_matches_reference(lat, rope, r, t_pp, heads, dtype, kw):
    _run_case(1, lat, rope, r, t_pp, heads, dtype, **kw)


def _deepseek_geometry(r: int = 64):
    width = (512 + 64) if r == 64 else (512 + 128)  # the rope key padded to whole rows
    pool = PoolLayout(page_bytes=64 * width * 2, dtype="bfloat16", row_elems=r)
    geom = page_geometry(KVSpec.mla(512, 64), pool)
    assert geom.tokens_per_page == 64
    return geom


@pytest.mark.parametrize(("r", "kw"), [
    (64, {}),  # the default: 64-token blocks, 2 stages, in order, 2 splits
    (64, {"block_t": 32}),  # 4 stages, lookahead
    (64, {"block_t": 32, "stages": 3, "window": 4096, "soft_cap": 30.0}),
    (128, {}),  # 4 latent chunks of 128 + 64 rope columns: 64-token blocks, 2 stages, in order
    (128, {"block_t": 32}),  # 4 stages, lookahead
    (64, {"wg0_chunks": 4}),  # half of the 8 latent chunks each (the default is 3 of 8)
    (64, {"block_t": 64, "lookahead": True}),  # 2 stages with the lookahead
    (128, {"engine": True}),  # the engine's GPU pages: 256 KiB, 192 tokens (`default_token_align`)
    (64, {"wide_values": True}),  # one [64, 512] value buffer a stage, 8-token TMA boxes
    (64, {"wide_values": True, "wg0_chunks": 4}),  # P @ V as two N = 256 wgmmas
    (128, {"engine": True, "wide_values": True}),
])
def test_lowers_to_mosaic_gpu_for_h200(monkeypatch, r, kw):
    kw = dict(kw)
    if kw.pop("engine", False):
        geom = page_geometry(KVSpec.mla(512, 64), PoolLayout(256 * 1024, "bfloat16", 128))
        assert geom.tokens_per_page == 192
    else:
        geom = _deepseek_geometry(r)
    b, h, pages = 32, 128, -(-8192 // geom.tokens_per_page)
    args = (S((b, h, 512), jnp.bfloat16), S((b, h, 64), jnp.bfloat16),
            S((b * pages + 8, geom.rows_per_page, r), jnp.bfloat16), S((b, pages), jnp.int32),
            S((b,), jnp.int32))
    fn = functools.partial(paged_mla_decode_attention_mgpu, geom=geom, scale=192**-0.5,
                           backend="gpu", **kw)
    text = lowered_for_h200(monkeypatch, fn, args)
    assert "mosaic_gpu" in text


def test_configuration_and_shared_memory_plan(monkeypatch):
    monkeypatch.setattr(attention_core, "num_sms", lambda: 132)
    geom = _deepseek_geometry()
    # 32 sequences x 2 head blocks: 2 splits make 128 CTAs, one wave on 132 SMs
    assert mgpu.default_config(geom, 32, 128, 8192) == mgpu.Config(64, 2, 2, wg0_chunks=3,
                                                                   lookahead=False)
    assert mgpu.default_config(geom, 32, 128, 8192, block_t=32) == mgpu.Config(
        32, 4, 2, wg0_chunks=3, lookahead=True)
    assert mgpu.default_config(geom, 1, 128, 131072).num_splits == 66  # one long sequence
    assert mgpu.default_config(geom, 64, 128, 2048).num_splits == 1  # 128 CTAs: one wave
    assert mgpu.default_config(geom, 4, 16, 600).num_splits == 1  # < 2 x 512 tokens
    # Q 72 KiB + 4 stages of 9 x [32, 64] bf16 + P 4 KiB + alpha (1 KiB aligned) + 11 barriers:
    # what Mosaic GPU allocates (checked against its own count when this was written)
    assert mgpu.smem_plan(geom, 32, 4) == 73728 + 4 * 36864 + 4096 + 1024 + 88
    assert mgpu.max_stages(geom, 32) == 4 and mgpu.max_stages(geom, 64) == 2
    assert mgpu.smem_plan(geom, 64, 3) > mgpu.SMEM_BYTES
    # R = 128: the rope chunk is loaded 64 columns wide, so a token takes 4 x 128 + 64
    # elements, as at R = 64: Q 64 + 8 KiB, 2 stages of 64 + 8 KiB, P 8 KiB, alpha, 7 barriers
    wide = _deepseek_geometry(128)
    assert mgpu.rope_cols(wide, 64) == mgpu.rope_cols(wide, 16) == 64
    assert mgpu.rope_cols(geom, 64) == 64
    assert mgpu.smem_plan(wide, 64, 2) == 65536 + 8192 + 2 * (65536 + 8192) + 8192 + 1024 + 56
    assert mgpu.max_stages(wide, 32) == 4 and mgpu.max_stages(wide, 64) == 2
    assert mgpu.default_config(wide, 32, 128, 8192) == mgpu.Config(64, 2, 2, wg0_chunks=1,
                                                                   lookahead=False)
    # the profiler gets the shared memory the launch leaves: 1,992 B beside the default
    assert mgpu.profile_ranges(geom, mgpu.Config(64, 2, 2)) == (232448 - 230456) // 48 == 41
    assert mgpu.profile_ranges(geom, mgpu.Config(32, 3, 2)) == mgpu.PROFILE_RANGES
    # wide values: the same bytes; P @ V pieces of at most 256 columns
    assert mgpu.default_config(geom, 32, 128, 8192, wide_values=True) == mgpu.Config(
        64, 2, 2, wg0_chunks=3, lookahead=False, wide_values=True)
    assert mgpu._value_pieces(3, 5, 64, True) == [(192, 256), (448, 64)]
    assert mgpu._value_pieces(1, 3, 128, True) == [(128, 256), (384, 128)]
    assert mgpu._value_pieces(1, 2, 64, False) == [(64, 64), (128, 64)]
    narrow = page_geometry(KVSpec.mla(256, 32), PoolLayout(16 * 3 * 256, "bfloat16", 128))
    assert mgpu.rope_cols(narrow, 16) == 32 and mgpu.rope_cols(narrow, 64) == 64


def test_rejects_what_it_cannot_do(monkeypatch):
    """Clear ValueErrors (the caller falls back to the Triton kernel); an empty batch."""
    rng = np.random.default_rng(2)
    spec = KVSpec.mla(128, 64)
    case = make_case(rng, spec, [3, 9], dtype="bfloat16", row_elems=64,
                     page_bytes=page_bytes_for(spec, 64, "bfloat16", 16))
    ql = jnp.ones((2, 4, 128), jnp.bfloat16)
    qr = jnp.ones((2, 4, 64), jnp.bfloat16)
    call = functools.partial(paged_mla_decode_attention_mgpu, ql, qr, case.arena, case.table,
                             case.lens, case.geom, scale=0.1, backend="interpret")
    with pytest.raises(ValueError, match="bf16/f16"):
        paged_mla_decode_attention_mgpu(ql, qr, case.arena.astype(jnp.float32), case.table,
                                        case.lens, case.geom, scale=0.1, backend="interpret")
    with pytest.raises(ValueError, match="block_t"):
        call(block_t=32)  # does not divide T = 16
    with pytest.raises(ValueError, match="stages"):
        call(stages=1)
    with pytest.raises(ValueError, match="backend"):
        call(backend="cuda")
    with monkeypatch.context() as mp:  # a launch that fills shared memory: no room to profile
        mp.setattr(mgpu, "SMEM_BYTES", mgpu.smem_plan(case.geom, 16, 2))
        with pytest.raises(ValueError, match="profiler"):
            call(block_t=16, stages=2, profile_dir="/nonexistent")
    with pytest.raises(ValueError, match="do not fit"):
        paged_mla_decode_attention_mgpu(ql, ql, case.arena, case.table, case.lens, case.geom,
                                        scale=0.1, backend="interpret")
    out, lse = paged_mla_decode_attention_mgpu(ql[:0], qr[:0], case.arena, case.table[:0],
                                               case.lens[:0], case.geom, scale=0.1,
                                               backend="interpret", return_lse=True)
    assert out.shape == (0, 4, 128) and lse.shape == (0, 4)  # no sequence: no launch
    with pytest.raises(ValueError, match="wg0_chunks=2"):
        call(wg0_chunks=2)  # 2 latent chunks of 64: none left for warpgroup 1
    one = KVSpec.mla(64, 64)  # 1 latent chunk of 64: nothing for a second warpgroup
    one_case = make_case(rng, one, [3], dtype="bfloat16", row_elems=64,
                         page_bytes=page_bytes_for(one, 64, "bfloat16", 16))
    with pytest.raises(ValueError, match="at least one"):
        paged_mla_decode_attention_mgpu(jnp.ones((1, 4, 64), jnp.bfloat16), qr[:1],
                                        one_case.arena, one_case.table, one_case.lens,
                                        one_case.geom, scale=0.1, backend="interpret")
    small = make_case(rng, spec, [3], dtype="bfloat16", row_elems=32,
                      page_bytes=page_bytes_for(spec, 32, "bfloat16", 16))
    with pytest.raises(ValueError, match="R=32"):
        paged_mla_decode_attention_mgpu(ql[:1], qr[:1], small.arena, small.table, small.lens,
                                        small.geom, scale=0.1, backend="interpret")
    geom = _deepseek_geometry()
    arena = jnp.zeros((2, geom.rows_per_page, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="shared memory"):
        mgpu.check_supported(geom, arena, mgpu.Config(64, 3, 1))
    gqa = page_geometry(KVSpec.gqa(1, 64), PoolLayout(page_bytes=4096, dtype="bfloat16",
                                                      row_elems=64))
    with pytest.raises(ValueError, match="MLA"):
        mgpu.check_supported(gqa, arena, mgpu.Config(16, 2, 1))
