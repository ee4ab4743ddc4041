"""HF safetensors import: every fixture loads into the params.py layout; values; sharded reads; bad input."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from checkpoints.hf_import import load_hf
from crosspool_jax.errors import CheckpointError
from crosspool_jax.models.config import ConfigError
from crosspool_jax.models.params import flatten, weight_specs

FIXTURES = Path(__file__).resolve().parents[1] / ".cache" / "hf_fixtures"
CASES = (
    sorted(p.name for p in FIXTURES.glob("*") if (p / "config.json").is_file()) if FIXTURES.is_dir() else []
)
pytestmark = pytest.mark.skipif(not CASES, reason="HF fixtures missing: run `bash scripts/fixtures.sh`")


def raw_tensors(case: str) -> dict[str, np.ndarray]:
    """Every tensor of a fixture as numpy (bf16 read as ml_dtypes.bfloat16 through the flax backend)."""
    out: dict[str, np.ndarray] = {}
    for f in sorted((FIXTURES / case).glob("*.safetensors")):
        with safe_open(str(f), framework="flax") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                out[k] = np.asarray(st.get_tensor(k))
    return out


@pytest.mark.parametrize("case", CASES)
def test_fixture_loads_with_spec_shapes_and_dtypes(case: str) -> None:
    cfg, w = load_hf(FIXTURES / case)
    specs = flatten(weight_specs(cfg)._asdict())
    got = flatten(w._asdict())
    assert sorted(got) == sorted(specs)
    for k, s in specs.items():
        assert got[k].shape == s.shape, k
        assert got[k].dtype == s.dtype, k
    if cfg.router_bias:
        assert got["ffn/moe/router_bias"].dtype == np.float32


@pytest.mark.parametrize("case", CASES)
def test_values_match_raw_safetensors(case: str) -> None:
    cfg, w = load_hf(FIXTURES / case)
    raw = raw_tensors(case)
    np.testing.assert_array_equal(np.asarray(w.attn["embed"]), raw["model.embed_tokens.weight"])
    last = cfg.num_layers - 1
    np.testing.assert_array_equal(
        np.asarray(w.attn["layers"]["post_attn_norm"][last]),
        raw[f"model.layers.{last}.post_attention_layernorm.weight"],
    )
    o = raw[f"model.layers.{last}.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(np.asarray(w.attn["layers"]["wo"][last]), o.T)
    if not cfg.tie_word_embeddings:
        np.testing.assert_array_equal(np.asarray(w.attn["lm_head"]), raw["lm_head.weight"].T)
    if cfg.moe_layers:
        j = len(cfg.moe_layers) - 1
        li, Im = cfg.moe_layers[j], cfg.moe_intermediate_size
        gu = np.asarray(w.ffn["moe"]["w_gate_up"][j, 1])
        down = np.asarray(w.ffn["moe"]["w_down"][j, 1])
        fused = f"model.layers.{li}.mlp.experts.gate_up_proj"
        if fused in raw:
            g, u = raw[fused][1, :Im], raw[fused][1, Im:]
            d = raw[f"model.layers.{li}.mlp.experts.down_proj"][1]
        else:
            mix = cfg.family.value == "mixtral"
            p = f"model.layers.{li}.{'block_sparse_moe' if mix else 'mlp'}.experts.1"
            g = raw[f"{p}.{'w1' if mix else 'gate_proj'}.weight"]
            u = raw[f"{p}.{'w3' if mix else 'up_proj'}.weight"]
            d = raw[f"{p}.{'w2' if mix else 'down_proj'}.weight"]
        np.testing.assert_array_equal(gu[:, :Im], g.T)
        np.testing.assert_array_equal(gu[:, Im:], u.T)
        np.testing.assert_array_equal(down, d.T)
        router = [k for k in raw if k.startswith(f"model.layers.{li}.") and k.endswith("gate.weight")]
        router = [k for k in router if "shared_expert_gate" not in k]
        np.testing.assert_array_equal(np.asarray(w.ffn["moe"]["router"][j]), raw[router[0]].T)
        if cfg.router_bias:
            np.testing.assert_array_equal(
                np.asarray(w.ffn["moe"]["router_bias"][j]),
                raw[f"model.layers.{li}.mlp.gate.e_score_correction_bias"].astype(np.float32),
            )
    if cfg.dense_layers:
        li, Id = cfg.dense_layers[0], cfg.dense_intermediate_size
        gu = np.asarray(w.ffn["dense"]["w_gate_up"][0])
        np.testing.assert_array_equal(gu[:, :Id], raw[f"model.layers.{li}.mlp.gate_proj.weight"].T)
        np.testing.assert_array_equal(gu[:, Id:], raw[f"model.layers.{li}.mlp.up_proj.weight"].T)


def test_qwen2_shared_expert_gate_values() -> None:
    case = "qwen2moe_gqa6x2_top2_shared40"
    cfg, w = load_hf(FIXTURES / case)
    raw = raw_tensors(case)
    li = cfg.moe_layers[0]
    np.testing.assert_array_equal(
        np.asarray(w.ffn["moe"]["shared_gate"][0]), raw[f"model.layers.{li}.mlp.shared_expert_gate.weight"].T
    )
    Is = cfg.shared_intermediate_size
    np.testing.assert_array_equal(
        np.asarray(w.ffn["moe"]["shared_gate_up"][0, :, Is:]),
        raw[f"model.layers.{li}.mlp.shared_expert.up_proj.weight"].T,
    )


def _per_expert_copy(src: str, dst: Path) -> None:
    """Rewrites a fused-expert fixture with per-expert tensor names (same values)."""
    raw = raw_tensors(src)
    out: dict[str, np.ndarray] = {}
    for k, v in raw.items():
        if k.endswith("experts.gate_up_proj"):
            p, n = k[: -len(".gate_up_proj")], v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}.{e}.gate_proj.weight"] = np.ascontiguousarray(v[e, :n])
                out[f"{p}.{e}.up_proj.weight"] = np.ascontiguousarray(v[e, n:])
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[f"{k[: -len('.down_proj')]}.{e}.down_proj.weight"] = np.ascontiguousarray(v[e])
        else:
            out[k] = v
    dst.mkdir()
    shutil.copy(FIXTURES / src / "config.json", dst / "config.json")
    save_file(out, str(dst / "model.safetensors"))


@pytest.mark.parametrize("case", [c for c in CASES if c.endswith("_fused") and not c.startswith("mixtral")])
def test_fused_and_per_expert_give_same_tree(case: str, tmp_path: Path) -> None:
    _per_expert_copy(case, tmp_path / "m")
    _, fused = load_hf(FIXTURES / case)
    _, per = load_hf(tmp_path / "m")
    a_flat, b_flat = flatten(fused._asdict()), flatten(per._asdict())
    assert sorted(a_flat) == sorted(b_flat)
    for k, a in a_flat.items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_flat[k]), err_msg=k)


def test_mixtral_fused_matches_block_sparse_moe_names(tmp_path: Path) -> None:
    case = "mixtral_gqa6x3_top2_fused"
    raw = raw_tensors(case)
    out: dict[str, np.ndarray] = {}
    for k, v in raw.items():
        if k.endswith("mlp.experts.gate_up_proj"):
            p, n = k[: -len("mlp.experts.gate_up_proj")] + "block_sparse_moe.experts", v.shape[1] // 2
            for e in range(v.shape[0]):
                out[f"{p}.{e}.w1.weight"] = np.ascontiguousarray(v[e, :n])
                out[f"{p}.{e}.w3.weight"] = np.ascontiguousarray(v[e, n:])
        elif k.endswith("mlp.experts.down_proj"):
            p = k[: -len("mlp.experts.down_proj")] + "block_sparse_moe.experts"
            for e in range(v.shape[0]):
                out[f"{p}.{e}.w2.weight"] = np.ascontiguousarray(v[e])
        else:
            out[k.replace("mlp.gate.weight", "block_sparse_moe.gate.weight")] = v
    (tmp_path / "m").mkdir()
    shutil.copy(FIXTURES / case / "config.json", tmp_path / "m" / "config.json")
    save_file(out, str(tmp_path / "m" / "model.safetensors"))
    _, fused = load_hf(FIXTURES / case)
    _, per = load_hf(tmp_path / "m")
    a_flat, b_flat = flatten(fused._asdict()), flatten(per._asdict())
    assert sorted(a_flat) == sorted(b_flat)
    for k, a in a_flat.items():
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b_flat[k]), err_msg=k)


def test_sharded_checkpoint_loads_all_shards() -> None:
    case = "qwen2moe_mha4_top8_e16_tied_sharded"
    assert len(list((FIXTURES / case).glob("model-*.safetensors"))) > 1
    cfg, w = load_hf(FIXTURES / case)
    raw = raw_tensors(case)
    li = cfg.moe_layers[-1]
    np.testing.assert_array_equal(
        np.asarray(w.ffn["moe"]["w_down"][-1, 3]), raw[f"model.layers.{li}.mlp.experts.3.down_proj.weight"].T
    )
    assert "lm_head" not in w.attn


def test_low_precision_dtypes_kept_and_cast() -> None:
    cfg, w = load_hf(FIXTURES / "dsv3_bf16_first2dense_shared2_top8")
    assert cfg.dtype == "bfloat16"
    assert w.attn["embed"].dtype == ml_dtypes.bfloat16
    assert w.ffn["moe"]["router_bias"].dtype == np.float32
    cfg16, w16 = load_hf(FIXTURES / "qwen3moe_gqa4x2_top2_fp16")
    assert cfg16.dtype == "float16" and w16.ffn["moe"]["w_gate_up"].dtype == np.float16
    cfg32, w32 = load_hf(FIXTURES / "dsv3_bf16_first2dense_shared2_top8", dtype="float32")
    assert cfg32.dtype == "float32" and w32.attn["embed"].dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(w32.attn["embed"]), np.asarray(w.attn["embed"]).astype(np.float32)
    )


def test_sharded_load_reads_slices_onto_mesh() -> None:
    case = "qwen3moe_gqa8x2_hd16_top8_e16"
    cfg0, ref = load_hf(FIXTURES / case)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "e"))

    def pick(s: jax.ShapeDtypeStruct) -> NamedSharding:
        if len(s.shape) == 4:  # [Lm, E, in, out]: experts over e, out over x when divisible
            return NamedSharding(mesh, P(None, "e", None, "x" if s.shape[3] % 2 == 0 else None))
        if len(s.shape) == 3 and s.shape[2] % 4 == 0:
            return NamedSharding(mesh, P(None, None, "e"))
        return NamedSharding(mesh, P())

    shardings = jax.tree.map(pick, weight_specs(cfg0))
    cfg, w = load_hf(FIXTURES / case, shardings=shardings)
    got, want, shard_of = flatten(w._asdict()), flatten(ref._asdict()), flatten(shardings._asdict())
    assert sorted(got) == sorted(want) == sorted(shard_of)
    for k, a in got.items():
        assert a.sharding == shard_of[k], k
        np.testing.assert_array_equal(np.asarray(a), np.asarray(want[k]), err_msg=k)
    shard = w.ffn["moe"]["w_gate_up"].addressable_shards[0]
    assert shard.data.shape[1] == cfg.num_experts // 4


# ---- bad input -------------------------------------------------------------------------------------

BAD_CASE = "qwen2moe_gqa6x2_top2_shared40"


def _write_modified(tmp_path: Path, edit: Callable[[dict[str, np.ndarray]], object]) -> Path:
    raw = raw_tensors(BAD_CASE)
    edit(raw)
    d = tmp_path / "bad"
    d.mkdir()
    shutil.copy(FIXTURES / BAD_CASE / "config.json", d / "config.json")
    save_file(raw, str(d / "model.safetensors"))
    return d


def test_missing_tensor_named(tmp_path: Path) -> None:
    d = _write_modified(tmp_path, lambda r: r.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(
        CheckpointError, match=r"1 tensor\(s\) missing.*model\.layers\.1\.mlp\.experts\.3\.up_proj"
    ):
        load_hf(d)


def test_many_missing_tensors_counted(tmp_path: Path) -> None:
    def drop(r: dict) -> None:
        for k in [k for k in r if ".experts.2." in k]:
            r.pop(k)

    d = _write_modified(tmp_path, drop)
    with pytest.raises(CheckpointError, match=r"6 tensor\(s\) missing.*experts\.2\..*\(\+3 more\)"):
        load_hf(d)


def test_extra_tensor_named(tmp_path: Path) -> None:
    def add(r: dict) -> None:
        r["model.layers.0.mlp.experts.99.gate_proj.weight"] = np.zeros((2, 2), np.float32)
        r["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((4,), np.float32)  # harmless

    d = _write_modified(tmp_path, add)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: 1 unexpected tensor\(s\): .*experts\.99\.gate_proj"
    ):
        load_hf(d)


def test_harmless_extras_ignored(tmp_path: Path) -> None:
    d = _write_modified(
        tmp_path, lambda r: r.update({"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
    )
    cfg, w = load_hf(d)
    assert w.attn["embed"].shape == (cfg.vocab_size, cfg.hidden_size)


def test_zero_size_deepseek_shared_experts_skipped() -> None:
    raw = raw_tensors("dsv2_h8_bias_top1_first2dense")
    assert any("shared_experts" in k and 0 in v.shape for k, v in raw.items())
    cfg, w = load_hf(FIXTURES / "dsv2_h8_bias_top1_first2dense")
    assert cfg.shared_intermediate_size == 0 and "shared_gate_up" not in w.ffn["moe"]


def test_wrong_shape_named(tmp_path: Path) -> None:
    def reshape(r: dict) -> None:
        r["model.layers.1.self_attn.q_proj.weight"] = r["model.layers.1.self_attn.q_proj.weight"][:-1]

    d = _write_modified(tmp_path, reshape)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\.q_proj\.weight has shape",
    ) as e:
        load_hf(d)
    assert "expected" in str(e.value) and "\n" not in str(e.value)


def test_unsupported_dtype_named(tmp_path: Path) -> None:
    def to_int(r: dict) -> None:
        r["model.norm.weight"] = r["model.norm.weight"].astype(np.int32)

    d = _write_modified(tmp_path, to_int)
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has unsupported dtype I32"):
        load_hf(d)


def test_mixed_tensor_dtypes_cast_to_model_dtype(tmp_path: Path) -> None:
    def mix(r: dict) -> None:
        r["model.norm.weight"] = r["model.norm.weight"].astype(np.float16)

    d = _write_modified(tmp_path, mix)
    cfg, w = load_hf(d)
    assert w.attn["final_norm"].dtype == np.dtype(cfg.dtype) == np.float32


def test_truncated_file_named(tmp_path: Path) -> None:
    d = tmp_path / "trunc"
    shutil.copytree(FIXTURES / BAD_CASE, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"trunc/model\.safetensors: corrupt or truncated"):
        load_hf(d)


def test_garbage_header_named(tmp_path: Path) -> None:
    d = tmp_path / "garbage"
    shutil.copytree(FIXTURES / BAD_CASE, d)
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match=r"garbage/model\.safetensors: corrupt or truncated"):
        load_hf(d)


def test_unknown_model_type(tmp_path: Path) -> None:
    d = tmp_path / "unk"
    shutil.copytree(FIXTURES / BAD_CASE, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama4_moe", ["Llama4ForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"unk/config\.json: unknown architecture.*llama4_moe"):
        load_hf(d)


def test_missing_shard_file_named(tmp_path: Path) -> None:
    d = tmp_path / "shards"
    shutil.copytree(FIXTURES / "qwen2moe_mha4_top8_e16_tied_sharded", d)
    os.remove(d / "model-00003-of-00006.safetensors")
    with pytest.raises(
        CheckpointError, match=r"index\.json: lists shard file\(s\) that do not exist: model-00003"
    ):
        load_hf(d)


def test_no_weights_at_all(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    shutil.copy(FIXTURES / BAD_CASE / "config.json", d / "config.json")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        load_hf(d)
