"""HF export (checkpoints/hf_export.py, crosspool_jax.demo.export_demo): exact round trips through our
importer, the byte-level tokenizer.json, clear errors, and, with the reference venv, parity with
transformers loading the exported directory (proof that it is a real HF checkpoint).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import HF_FIXTURES, ROOT, fixture_cases

from checkpoints import load_model
from checkpoints.hf_export import ExportError, byte_tokenizer_json, hf_config_dict, save_hf
from checkpoints.hf_import import _open_files
from checkpoints.tokenizer import ByteTokenizer, HFTokenizer
from crosspool_jax.demo import EXPORT_MARKER, demo_configs, demo_models, export_demo
from crosspool_jax.models.config import (
    AttentionKind,
    Family,
    FFNKind,
    ModelConfig,
    QKNorm,
    RopeConfig,
    RopeStyle,
    RouterKind,
)
from crosspool_jax.models.params import flatten, init_random_weights
from crosspool_jax.models.reference import ReferenceGenerator

DEMOS = list(demo_configs())
REF_PYTHON = pathlib.Path(os.environ.get("CROSSPOOL_REF_PYTHON", ROOT / ".venv-ref" / "bin" / "python"))
TEXTS = [
    "Hello, world!",
    "",
    " leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld, ñandú, Æsir",
    "世界 こんにちは 안녕하세요",
    "emoji 🎉🚀 and a ZWJ family 👨‍👩‍👧",
    "literal specials: <|bos|> <|eos|> <s> </s> <unk>",
    "\x00 control \x7f bytes",
]
PROMPT_TEXT = "The quick brown fox"


def _flat_np(weights) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flatten(weights._asdict()).items()}


def _assert_same_weights(a, b) -> None:
    fa, fb = _flat_np(a), _flat_np(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        assert fa[k].shape == fb[k].shape, k
        assert np.array_equal(fa[k].view(np.uint8), fb[k].view(np.uint8)), f"{k} differs"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("demo_export")
    return {name: pathlib.Path(export_demo(root / name, name)) for name in DEMOS}


@pytest.fixture(scope="module")
def models() -> dict:
    return demo_models()


@pytest.fixture(scope="module")
def generators(exported) -> dict[str, ReferenceGenerator]:
    """One ReferenceGenerator per exported demo (loaded back), shared so that each compiles once."""
    out = {}
    for name, d in exported.items():
        loaded = load_model(d)
        out[name] = ReferenceGenerator(loaded.config, loaded.weights)
    return out


# ---- round trips through our importer -------------------------------------------------------------


@pytest.mark.parametrize("name", DEMOS)
def test_export_demo_round_trip_is_exact(name: str, exported, models) -> None:
    d = exported[name]
    names = sorted(os.listdir(d))
    assert names == sorted(
        [
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
            EXPORT_MARKER,
        ]
    )
    loaded = load_model(d)
    assert loaded.config == models[name].config  # every field, dtype included
    _assert_same_weights(loaded.weights, models[name].weights)
    hf = json.loads((d / "config.json").read_text())
    gen = json.loads((d / "generation_config.json").read_text())
    assert (
        (hf["bos_token_id"], hf["eos_token_id"]) == (256, 257) == (gen["bos_token_id"], gen["eos_token_id"])
    )


@pytest.mark.parametrize("name", DEMOS)
def test_greedy_tokens_of_the_export_equal_the_demo_model(name: str, exported, models, generators) -> None:
    tok = load_model(exported[name]).tokenizer
    prompt = tok.encode(PROMPT_TEXT)
    assert prompt == ByteTokenizer().encode(PROMPT_TEXT)
    gen, demo = generators[name], models[name]
    assert gen.cfg == demo.config
    got = gen.generate(prompt, 8).token_ids
    # the same compiled program (equal configs) run on the in-memory demo weights
    loaded_weights, gen.weights = gen.weights, demo.weights
    try:
        want = gen.generate(prompt, 8).token_ids
    finally:
        gen.weights = loaded_weights
    assert got == want
    assert tok.decode(got) == ByteTokenizer().decode(got)


def test_byte_tokenizer_json_equals_byte_tokenizer(exported) -> None:
    tok, ref = load_model(exported[DEMOS[0]]).tokenizer, ByteTokenizer()
    assert isinstance(tok, HFTokenizer)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (ref.vocab_size, ref.bos_id, ref.eos_id)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.decode(ids) == text
        with_specials = [ref.bos_id, *ids, ref.eos_id, ref.bos_id]
        assert tok.decode(with_specials) == ref.decode(with_specials) == text
    # invalid UTF-8 (a character split, stray continuation bytes) decodes with the same replacements
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = [int(i) for i in rng.integers(0, 258, rng.integers(1, 12))]
        assert tok.decode(ids) == ref.decode(ids), ids
    assert tok.decode(ref.encode("世界")[:-1]) == ref.decode(ref.encode("世界")[:-1])
    tc = json.loads((exported[DEMOS[0]] / "tokenizer_config.json").read_text())
    assert (tc["bos_token"], tc["eos_token"]) == ("<|bos|>", "<|eos|>")


def test_save_hf_bfloat16_sharded_and_reexport(tmp_path: pathlib.Path, models) -> None:
    m = models["demo-deepseek-v3"]
    d = tmp_path / "m"
    save_hf(d, m.config, m.weights, dtype="bfloat16", max_shard_bytes=20_000)
    files = sorted(os.listdir(d))
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    loaded = load_model(d)
    assert loaded.config == m.config.replace(dtype="bfloat16")
    want = {
        k: np.asarray(v if k.endswith("router_bias") else jnp.asarray(v, jnp.bfloat16))
        for k, v in flatten(m.weights._asdict()).items()
    }
    got = _flat_np(loaded.weights)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    tensors = _open_files(str(d))
    assert {t.st_dtype for n, t in tensors.items() if "e_score_correction_bias" in n} == {"F32"}
    # saving again, unsharded and without a tokenizer, leaves no stale shard, index or tokenizer
    save_hf(d, m.config, m.weights, tokenizer_json=byte_tokenizer_json())
    save_hf(d, m.config, m.weights)
    assert sorted(os.listdir(d)) == ["config.json", "generation_config.json", "model.safetensors"]
    _assert_same_weights(load_model(d).weights, m.weights)


def test_export_demo_refuses_unknown_names_and_foreign_directories(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ExportError, match="demo-mixtral, demo-qwen3-moe, demo-deepseek-v3"):
        export_demo(tmp_path / "x", "demo-llama")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export_demo(busy)
    assert sorted(os.listdir(busy)) == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(ExportError, match="not a directory"):
        export_demo(tmp_path / "file")
    # an earlier export may be overwritten, even with another model
    d = tmp_path / "again"
    assert export_demo(d, "demo-qwen3-moe") == str(d)
    export_demo(d, "demo-mixtral", dtype="float16")
    loaded = load_model(d)
    assert loaded.config.family == Family.MIXTRAL and loaded.config.dtype == "float16"
    assert json.loads((d / EXPORT_MARKER).read_text())["model"] == "demo-mixtral"


def test_configs_an_hf_config_cannot_express_raise() -> None:
    cfgs = demo_configs()
    mixtral, ds = cfgs["demo-mixtral"], cfgs["demo-deepseek-v3"]
    with pytest.raises(ExportError, match=r"mixtral.*qk_norm"):
        hf_config_dict(mixtral.replace(qk_norm=QKNorm.PER_HEAD))
    with pytest.raises(ExportError, match=r"mixtral.*sliding_windows"):
        hf_config_dict(mixtral.replace(sliding_windows=(16, 0)))
    with pytest.raises(ExportError, match=r"deepseek_v3.*shared_intermediate_size"):
        hf_config_dict(ds.replace(shared_intermediate_size=40))
    with pytest.raises(ExportError, match=r"deepseek_v3.*ffn_kinds"):
        hf_config_dict(ds.replace(ffn_kinds=(FFNKind.MOE, FFNKind.DENSE)))
    with pytest.raises(ExportError, match=r"deepseek_v3.*rope_style"):
        hf_config_dict(ds.replace(rope_style=RopeStyle.INTERLEAVED))
    with pytest.raises(ExportError, match="dtype int8 is not supported"):
        save_hf("/nonexistent/never-written", ds, init_random_weights(ds), dtype="int8")
    with pytest.raises(ExportError, match="dtype fp7 is not supported"):
        save_hf("/nonexistent/never-written", ds, init_random_weights(ds), dtype="fp7")
    with pytest.raises(ExportError, match="weights do not match"):
        save_hf("/nonexistent/never-written", ds, init_random_weights(mixtral))


@pytest.mark.skipif(not fixture_cases(), reason="run `bash scripts/fixtures.sh` to build the HF fixtures")
def test_export_of_every_hf_fixture_is_an_exact_inverse(tmp_path: pathlib.Path) -> None:
    """Import -> export -> import gives the same config and weights; the tensors written equal
    transformers' own save_pretrained files (names, dtypes, bytes), except for fused-format fixtures."""
    for case in fixture_cases():
        src = HF_FIXTURES / case["name"]
        m = load_model(src)
        out = tmp_path / case["name"]
        tok = src / "tokenizer.json"
        save_hf(out, m.config, m.weights, tokenizer_json=str(tok) if tok.is_file() else None)
        back = load_model(out)
        assert back.config == m.config, case["name"]
        _assert_same_weights(back.weights, m.weights)
        if case.get("format") == "fused":
            continue
        theirs, ours = _open_files(str(src)), _open_files(str(out))
        assert sorted(theirs) == sorted(ours), case["name"]
        for n, t in theirs.items():
            full = tuple(slice(0, s) for s in t.shape)
            assert t.st_dtype == ours[n].st_dtype, (case["name"], n)
            assert np.array_equal(t.read(full).view(np.uint8), ours[n].read(full).view(np.uint8)), n


# ---- parity with transformers ---------------------------------------------------------------------

_COMMON = dict(
    vocab_size=258,
    hidden_size=64,
    num_layers=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope=RopeConfig(theta=10000.0),
    sliding_windows=(0, 0),
    bos_token_id=256,
    eos_token_ids=(257,),
)
# The other three families, each with what sets it apart.
EXTRA_CONFIGS = {
    "qwen2-moe": ModelConfig(
        family=Family.QWEN2_MOE,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        qkv_bias=True,
        ffn_kinds=(FFNKind.MOE, FFNKind.DENSE),
        dense_intermediate_size=96,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=32,
        shared_intermediate_size=48,
        shared_expert_gate=True,
        **_COMMON,
    ),
    "olmoe": ModelConfig(
        family=Family.OLMOE,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        qkv_bias=True,
        o_bias=True,
        qk_norm=QKNorm.FULL,
        clip_qkv=3.0,
        ffn_kinds=(FFNKind.MOE, FFNKind.MOE),
        num_experts=8,
        top_k=2,
        moe_intermediate_size=32,
        norm_topk_prob=False,
        **_COMMON,
    ),
    "deepseek-v2": ModelConfig(
        family=Family.DEEPSEEK_V2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=24,
        attention=AttentionKind.MLA,
        rope_style=RopeStyle.INTERLEAVED,
        kv_lora_rank=32,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        ffn_kinds=(FFNKind.DENSE, FFNKind.MOE),
        dense_intermediate_size=96,
        num_experts=8,
        top_k=2,
        moe_intermediate_size=32,
        shared_intermediate_size=64,
        router=RouterKind.SOFTMAX_GROUP_LIMITED,
        routed_scaling_factor=2.0,
        n_group=2,
        topk_group=1,
        **_COMMON,
    ),
}

_HF_SCRIPT = r"""
import json, sys
import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

spec = json.load(open(sys.argv[1]))
out, info = {}, {}
for name, d in spec["dirs"].items():
    model, load = AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager",
        output_loading_info=True,
    )
    row = {"class": type(model).__name__, "load": {k: sorted(map(str, v)) for k, v in load.items()}}
    with torch.no_grad():
        out[name] = model.eval()(torch.tensor([spec["prompt"]])).logits[0].float().numpy()
    if name in spec["tokenizer"]:
        tok = AutoTokenizer.from_pretrained(d)
        ids = tok(spec["text"], add_special_tokens=False).input_ids
        row["tokens"] = {"ids": ids, "decoded": tok.decode(ids + [256, 257], skip_special_tokens=True),
                         "bos": tok.bos_token_id, "eos": tok.eos_token_id}
    info[name] = row
np.savez(spec["out"], **out)
print(json.dumps(info))
"""


@pytest.mark.skipif(
    not REF_PYTHON.is_file(),
    reason=f"no reference venv at {REF_PYTHON} (`bash scripts/bootstrap.sh --ref` creates .venv-ref)",
)
def test_transformers_loads_the_export_and_computes_our_logits(
    tmp_path: pathlib.Path, exported, models, generators
) -> None:
    dirs = {name: str(exported[name]) for name in DEMOS}
    ours: dict[str, ReferenceGenerator] = dict(generators)
    for i, (name, cfg) in enumerate(EXTRA_CONFIGS.items()):
        w = init_random_weights(cfg, seed=100 + i, scale=0.5)
        save_hf(tmp_path / name, cfg, w)
        dirs[name], ours[name] = str(tmp_path / name), ReferenceGenerator(cfg, w)
    text = "héllo wörld 世界 🎉"
    prompt = ByteTokenizer().encode(PROMPT_TEXT)
    spec = {
        "dirs": dirs,
        "prompt": prompt,
        "text": text,
        "tokenizer": DEMOS[:1],
        "out": str(tmp_path / "l.npz"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "hf.py").write_text(_HF_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_", "PYTHON"))}
    proc = subprocess.Popen(
        [str(REF_PYTHON), str(tmp_path / "hf.py"), str(tmp_path / "spec.json")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:  # our logits while transformers runs
        logits = {name: gen.prompt_logits(prompt) for name, gen in ours.items()}
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"transformers failed:\n{stderr[-4000:]}"
    info = json.loads(stdout.strip().splitlines()[-1])
    theirs = np.load(tmp_path / "l.npz")
    for name, got in logits.items():
        assert info[name]["load"] == {k: [] for k in info[name]["load"]}, (name, info[name]["load"])
        ref = theirs[name]
        assert got.shape == ref.shape == (len(prompt), 258)
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        per_pos = (np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)).max()
        assert rel < 1e-4 and per_pos < 1e-4, (
            f"{name}: relative logit error {rel:.2e} (worst position {per_pos:.2e})"
        )
    tok = info[DEMOS[0]]["tokens"]
    assert tok["ids"] == ByteTokenizer().encode(text)
    assert tok["decoded"] == text
    assert (tok["bos"], tok["eos"]) == (256, 257)
