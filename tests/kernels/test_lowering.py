"""The GPU (Triton) and TPU (Mosaic) kernels lower on this CPU-only machine, and never copy the arena.

Lowering runs the whole Pallas -> Triton IR / Mosaic MLIR translation (what fails for an
unsupported op or shape), against an abstract H200 or TPU device; only the final machine-code
compile needs the real chip (benchmarks/kernels.py runs it on a GPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax._src.mesh import AbstractDevice, AbstractMesh

from pallas_kernels.append import kv_append, mla_kv_append
from pallas_kernels.decode import paged_decode_attention, paged_mla_decode_attention
from pallas_kernels.page_layout import KVSpec, PoolLayout, page_geometry
from pallas_kernels.prefill import paged_mla_prefill_attention, paged_prefill_attention

S = jax.ShapeDtypeStruct
DEVICES = {
    "gpu": ("cuda", AbstractDevice("NVIDIA H200", 132, "gpu"), "xla.gpu.triton"),
    "tpu": ("tpu", AbstractDevice("TPU v5 lite", 1, "tpu"), "tpu_custom_call"),
}


def _programs(backend: str):
    r_mla = 64 if backend == "gpu" else 128
    pool = PoolLayout(page_bytes=65536, dtype="bfloat16", row_elems=128)
    g = page_geometry(KVSpec.gqa(8, 128), pool, platform=backend)
    pool2 = PoolLayout(page_bytes=65536, dtype="bfloat16", row_elems=r_mla)
    g2 = page_geometry(KVSpec.mla(512, 64), pool2, platform=backend)
    a, a2 = S(pool.arena_shape(64), jnp.bfloat16), S(pool2.arena_shape(64), jnp.bfloat16)
    tb, ln, cu = S((4, 8), jnp.int32), S((4,), jnp.int32), S((5,), jnp.int32)
    bf = lambda *shape: S(shape, jnp.bfloat16)
    progs = {
        "decode": (lambda q, a, t, n: paged_decode_attention(q, a, t, n, g, backend=backend),
                   (bf(4, 32, 128), a, tb, ln)),
        "mla_decode": (lambda x, y, a, t, n: paged_mla_decode_attention(
            x, y, a, t, n, g2, scale=0.1, backend=backend),
            (bf(4, 128, 512), bf(4, 128, 64), a2, tb, ln)),
        "prefill": (lambda q, a, t, n, c: paged_prefill_attention(q, a, t, n, c, g,
                                                                  backend=backend),
                    (bf(100, 32, 128), a, tb, ln, cu)),
        "mla_prefill": (lambda x, y, a, t, n, c: paged_mla_prefill_attention(
            x, y, a, t, n, c, g2, scale=0.1, backend=backend),
            (bf(100, 16, 512), bf(100, 16, 64), a2, tb, ln, cu)),
        "append": (lambda a, s, k, v: kv_append(a, s, k, v, g, backend=backend),
                   (a, S((7,), jnp.int32), bf(7, 8, 128), bf(7, 8, 128))),
        "mla_append": (lambda a, s, k, v: mla_kv_append(a, s, k, v, g2, backend=backend),
                       (a2, S((7,), jnp.int32), bf(7, 512), bf(7, 64))),
    }
    if backend == "gpu":
        progs["decode_persistent"] = (
            lambda q, a, t, n: paged_decode_attention(q, a, t, n, g, backend=backend,
                                                      schedule="persistent"),
            (bf(4, 32, 128), a, tb, ln))
        progs["prefill_one_row_decode"] = (  # a mixed step's decode rows in the decode kernel
            lambda q, a, t, n, c: paged_prefill_attention(q, a, t, n, c, g, backend=backend,
                                                          one_row_decode=True),
            (bf(100, 32, 128), a, tb, ln, cu))
    return progs


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_every_kernel_lowers(backend):
    platform, device, target = DEVICES[backend]
    mesh = AbstractMesh((1,), ("x",), abstract_device=device)
    for name, (fn, args) in _programs(backend).items():
        with jax.sharding.use_abstract_mesh(mesh):
            text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
        assert target in text, name
        if "append" in name:  # the kernel writes the arena in place
            assert "output_operand_aliases" in text, name


def _arena_consumers(jaxpr, var, path=()):
    """Primitive paths from ``var`` to its consumers, following reshapes and nested jits."""
    found = []
    for eqn in jaxpr.eqns:
        for i, v in enumerate(eqn.invars):
            if v is not var:
                continue
            name = eqn.primitive.name
            if name in ("pjit", "jit", "closed_call"):
                inner = eqn.params["jaxpr"].jaxpr
                found += _arena_consumers(inner, inner.invars[i], (*path, name))
            elif name == "reshape":
                found += _arena_consumers(jaxpr, eqn.outvars[0], (*path, name))
            else:
                found.append((*path, name))
    return found


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_kernels_read_the_arena_in_place(backend):
    """Every path from the arena argument ends in a pallas_call after nothing but reshapes.

    A reshape that merges the leading dims of a row-major array is a bitcast in XLA (GPU/CPU);
    the TPU kernels take the 3-D arena as is. No slice, gather, pad or copy of the arena.
    """
    for name, (fn, args) in _programs(backend).items():
        if "append" in name:
            continue
        closed = jax.make_jaxpr(fn)(*args)
        arena_pos = 2 if name.startswith("mla") else 1
        paths = _arena_consumers(closed.jaxpr, closed.jaxpr.invars[arena_pos])
        assert paths, name
        for p in paths:
            assert p[-1] == "pallas_call", (name, p)
            if backend == "tpu":
                assert "reshape" not in p, (name, p)


def test_default_kv_blocks_fit_shared_memory():
    """run_blocks' default block_t shrinks until the Triton tiles fit an H100's shared memory
    (hand-checked bytes: query tile + stages x KV tile, bf16)."""
    from pallas_kernels.attention_core import TRITON_SMEM_BYTES, fit_block_t

    # MLA at 128-wide rows (the GPU engine's arena): 64 x 640 query + 2 x 64 x 640 = 245,760 B
    # > 232,448: 32-token blocks (163,840 B)
    assert TRITON_SMEM_BYTES < (64 * 640 + 2 * 64 * 640) * 2
    assert fit_block_t(64, 2, 64, 640, 640, 2) == 32
    # MLA at 64-wide rows (576 = 9 x 64): 221,184 B fits as it is
    assert fit_block_t(64, 2, 64, 576, 576, 2) == 64
    # GQA decode (16 rows of 128, K and V tiles of 128): unchanged
    assert fit_block_t(64, 2, 16, 128, 256, 2) == 64
    # never below 16 tokens
    assert fit_block_t(64, 2, 4096, 4096, 4096, 4) == 16
