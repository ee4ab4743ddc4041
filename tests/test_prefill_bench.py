"""`benchmarks/prefill.py` on CPU (`--smoke`): the correctness check passes, every (prompt, variant)
row is written with positive tokens/s and MFU, and the chunk bookkeeping (which chunks are timed,
how a prompt's seconds are summed) is exact."""

from __future__ import annotations

import json

from benchmarks import prefill


def test_timed_chunks_and_their_sum() -> None:
    assert prefill.timed_chunks(3) == [0, 1, 2]
    got = prefill.timed_chunks(16)  # 32K prompt in 2,048-token chunks: 8 of 16 timed, ends included
    assert len(got) == prefill.MAX_TIMED_CHUNKS and got[0] == 0 and got[-1] == 15
    # chunks 0 and 2 timed at 1 s and 3 s: chunk 1 is interpolated at 2 s
    assert prefill.prompt_seconds({0: 1.0, 2: 3.0}, 3) == 6.0


def test_prefill_smoke_on_cpu(tmp_path) -> None:
    out = tmp_path / "prefill.json"
    assert prefill.main(["--smoke", "--iters", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["correctness"] == {"demo-mixtral engine": True, "demo-mixtral xla": True}
    rows = {(r["prompt"], r["variant"]): r for r in res["rows"]}
    assert set(rows) == {(16, "engine"), (16, "xla"), (64, "engine"), (64, "xla")}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["mfu"] > 0 and r["model_flops"] > 0
        assert r["chunks"] == r["prompt"] // 16 and r["timed_chunks"] == list(range(r["chunks"]))
    # the longer prompt attends over more context: a larger share of its FLOPs is attention
    assert rows[(64, "engine")]["attention_share"] > rows[(16, "engine")]["attention_share"]


def test_batched_prompts_count_every_prompt(tmp_path) -> None:
    """`--batch 1,2 --variants engine`: one row per (prompt, batch); a batch of 2 holds twice the
    model FLOPs of one prompt, and its tokens/s counts both prompts."""
    out = tmp_path / "prefill_batch.json"
    assert prefill.main(["--smoke", "--iters", "1", "--batch", "1,2", "--variants", "engine",
                         "--json", str(out)]) == 0
    rows = {(r["prompt"], r["batch"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(16, 1), (16, 2), (64, 1), (64, 2)}
    assert {r["variant"] for r in rows.values()} == {"engine"}
    for p in (16, 64):
        one, two = rows[(p, 1)], rows[(p, 2)]
        assert two["model_flops"] == 2 * one["model_flops"]
        assert abs(two["tokens_per_s"] * two["seconds"] - 2 * p) < 1e-6 * p
        assert two["attention_share"] == one["attention_share"]


def test_several_requests_inputs() -> None:
    """`layer_loop.prefill_inputs(requests=3)`: 3 chunks of 4 tokens side by side, each at its own
    positions after the same context, on pages of its own."""
    import jax
    import numpy as np

    from benchmarks.calibrate import build
    from benchmarks.layer_loop import prefill_inputs
    from crosspool_jax.execution.pooled_step import model_geometry
    from pallas_kernels.page_layout import PoolLayout

    layout = PoolLayout(16384, "float32", 64, 1)
    store, cfg = build("demo-mixtral", None, jax.devices()[0], layout, 64)
    tpp = model_geometry(cfg, layout, "cpu").tokens_per_page
    arr, width = prefill_inputs(store, cfg, tpp, 4, np.random.default_rng(0), context=5, requests=3)
    assert arr["tokens"].shape == (1, 12) and arr["tail_pages"].shape[1] == 3
    assert arr["cu_q"][0].tolist() == [0, 4, 8, 12]
    assert arr["tok_slot"][0].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert arr["positions"][0].tolist() == [5, 6, 7, 8] * 3
    assert arr["sample_row"][0].tolist() == [3, 7, 11] and arr["tail_len"][0].tolist() == [9] * 3
    assert arr["grp_rows"][0, 0] == 12 and arr["grp_slots"][0, 0] == 3
    pages = arr["tail_pages"][0][arr["tail_pages"][0] >= 0]
    assert len(set(pages.tolist())) == pages.size  # no page shared between requests or layers
    assert width >= -(-9 // tpp)


def test_kernel_variants_and_bad_variant(capsys) -> None:
    """Each variant's attention kernels (`engine`: the engine's default); an unknown variant is
    refused before anything runs."""
    import pytest

    from pallas_kernels.dispatch import ATTENTION_KERNELS, DEFAULT_ATTENTION_KERNELS

    assert set(prefill.VARIANTS) == set(prefill.KERNELS)
    assert prefill.KERNELS["engine"] == DEFAULT_ATTENTION_KERNELS
    assert {prefill.KERNELS[v] for v in ("triton", "mosaic", "auto")} == set(ATTENTION_KERNELS)
    with pytest.raises(SystemExit):
        prefill.main(["--smoke", "--variants", "cutlass"])
    assert "--variants" in capsys.readouterr().err
