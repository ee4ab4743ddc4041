"""The q/k/v epilogue kernel (`pallas_kernels.qkv_epilogue`) on a GPU: correctness, then its time
against the jnp path XLA fuses (`qkv_epilogue_reference`), at the prefill shapes of the engine.

Run on a GPU machine from the repository root::

    PYTHONPATH=.:.gpu-vendor python -m benchmarks.qkv_epilogue_bench [--tokens 4100,16384]

Shapes: OLMoE-1B-7B (16 q / 16 kv heads, D 128, full-width q/k RMS norm) and Qwen3-30B-A3B (32 q /
4 kv heads, D 128, per-head norm), bf16, HALF rotary, one model's weights. Rows per call: the
`--tokens` list (4100 leaves a partial row block). ``--smoke`` runs toy sizes in interpret mode on
CPU (the timings then mean nothing). The table's "bytes/s" is the bytes the epilogue must move
(read qkv once, write q, k and v once) over the time.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.kernels import bench
from pallas_kernels.qkv_epilogue import qkv_epilogue

SHAPES = {  # name: (q heads, kv heads, head dim, norm)
    "olmoe-1b-7b": (16, 16, 128, "full"),
    "qwen3-30b-a3b": (32, 4, 128, "per_head"),
}


def _inputs(t: int, heads: int, kv_heads: int, d: int, norm: str, seed: int):
    ks = jax.random.split(jax.random.key(seed), 4)
    qkv = (2.0 * jax.random.normal(ks[0], (t, (heads + 2 * kv_heads) * d))).astype(jnp.bfloat16)
    wq, wk = (heads * d, kv_heads * d) if norm == "full" else (d, d)
    q_w = (1 + 0.3 * jax.random.normal(ks[1], (1, wq))).astype(jnp.bfloat16)
    k_w = (1 + 0.3 * jax.random.normal(ks[2], (1, wk))).astype(jnp.bfloat16)
    pos = jax.random.randint(ks[3], (t,), 0, 32768).astype(jnp.float32)
    freqs = pos[:, None] * (1e6 ** (-jnp.arange(d // 2) / (d // 2)))[None]
    return qkv, q_w, k_w, jnp.zeros((t,), jnp.int32), jnp.cos(freqs), jnp.sin(freqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="4100,16384", help="rows per call, comma-separated")
    ap.add_argument("--smoke", action="store_true", help="toy sizes, interpret mode (CPU)")
    args = ap.parse_args()
    tokens = [40] if args.smoke else [int(x) for x in args.tokens.split(",")]
    kernel = "interpret" if args.smoke else "gpu"
    print(f"device: {jax.devices()[0].device_kind}")
    rows, ok = [], True
    for name, (h, k, d, norm) in SHAPES.items():
        for t in tokens:
            ins = _inputs(t, h, k, d, norm, seed=t)
            kw = dict(heads=h, kv_heads=k, head_dim=d, norm=norm, eps=1e-6, clip=None)
            got = qkv_epilogue(*ins, backend=kernel, **kw)
            want = qkv_epilogue(*ins, backend="reference", **kw)
            err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32))))
                      for g, w in zip(got, want, strict=True))
            same = float(np.mean([np.mean(np.asarray(g) == np.asarray(w))
                                  for g, w in zip(got, want, strict=True)]))
            good = err <= 2 ** -6 * 8 and same > 0.97  # bf16 values up to ~8, one step apart
            ok &= good
            print(f"check {name} T={t}: max |diff| {err:.4g}, equal {same:.4f} "
                  f"{'ok' if good else 'FAIL'}")
            times = {be: bench(functools.partial(qkv_epilogue, backend=be, **kw), *ins,
                               iters=20, trials=5)
                     for be in (kernel, "reference")}
            nbytes = 2 * ins[0].size * ins[0].dtype.itemsize
            rows.append((name, t, times[kernel], times["reference"], nbytes))
    print(f"\n{'shape':<15}{'T':>7}{'kernel us':>11}{'xla us':>9}{'xla/kernel':>12}"
          f"{'kernel GB/s':>13}{'xla GB/s':>10}")
    for name, t, tk, tr, nb in rows:
        print(f"{name:<15}{t:>7}{tk * 1e6:>11.1f}{tr * 1e6:>9.1f}{tr / tk:>12.2f}"
              f"{nb / tk / 1e9:>13.0f}{nb / tr / 1e9:>10.0f}")
    if not ok:
        raise SystemExit("qkv_epilogue: the kernel differs from its reference")


if __name__ == "__main__":
    main()
