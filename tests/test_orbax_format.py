"""The engine's orbax format: round trip across meshes (bit-identical, requested shardings), broken dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from checkpoints import ByteTokenizer, is_crosspool_checkpoint, load_model
from checkpoints.hf_import import load_hf
from checkpoints.orbax_format import restore, save
from crosspool_jax.errors import CheckpointError
from crosspool_jax.models.config import ModelConfig
from crosspool_jax.models.params import ModelWeights, flatten, weight_specs

FIXTURES = Path(__file__).resolve().parents[1] / ".cache" / "hf_fixtures"
CASE = "qwen2moe_gqa6x2_top2_shared40"  # 8 experts, shared expert, tokenizer.json
pytestmark = pytest.mark.skipif(not (FIXTURES / CASE).is_dir(), reason="run `bash scripts/fixtures.sh`")


def _save_sharded_on_4(tmp_path: Path) -> tuple[ModelConfig, ModelWeights, Path]:
    """Loads the fixture onto mesh A (devices 0-3, experts sharded) and saves it."""
    cfg0, _ = load_hf(FIXTURES / CASE)
    mesh_a = Mesh(np.array(jax.devices()[:4]), ("e",))

    def pick_a(s: jax.ShapeDtypeStruct) -> NamedSharding:
        return NamedSharding(mesh_a, P(None, "e") if len(s.shape) == 4 else P())

    cfg, w = load_hf(FIXTURES / CASE, shardings=jax.tree.map(pick_a, weight_specs(cfg0)))
    assert w.ffn["moe"]["w_down"].sharding.spec == P(None, "e")
    out = tmp_path / "ck"
    save(out, cfg, w, tokenizer_json_path=FIXTURES / CASE / "tokenizer.json")
    return cfg, w, out


def test_round_trip_onto_a_different_mesh(tmp_path: Path) -> None:
    cfg, w, out = _save_sharded_on_4(tmp_path)
    assert is_crosspool_checkpoint(out)
    # mesh B: all 8 devices as 2x4, other partitioning (model dims instead of experts).
    mesh_b = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"))

    def pick_b(s: jax.ShapeDtypeStruct) -> NamedSharding:
        spec = [None] * len(s.shape)
        if len(s.shape) >= 2 and s.shape[-1] % 4 == 0:
            spec[-1] = "y"
        if len(s.shape) >= 3 and s.shape[-2] % 2 == 0:
            spec[-2] = "x"
        return NamedSharding(mesh_b, P(*spec))

    target = jax.tree.map(pick_b, weight_specs(cfg))
    cfg2, w2 = restore(out, target)
    assert cfg2 == cfg
    got, want, shard_of = flatten(w2._asdict()), flatten(w._asdict()), flatten(target._asdict())
    assert sorted(got) == sorted(want)
    for k, a in got.items():
        assert a.sharding == shard_of[k], k
        assert a.dtype == want[k].dtype, k
        np.testing.assert_array_equal(np.asarray(a), np.asarray(want[k]), err_msg=k)
    assert got["attn/layers/wq"].sharding.spec == P(None, "x", "y")
    assert got["ffn/moe/w_gate_up"].sharding.spec == P(None, None, "x", None)


def test_round_trip_onto_the_other_four_devices(tmp_path: Path) -> None:
    cfg, w, out = _save_sharded_on_4(tmp_path)
    mesh_c = Mesh(np.array(jax.devices()[4:]).reshape(2, 2), ("a", "b"))

    def pick_c(s: jax.ShapeDtypeStruct) -> NamedSharding:
        spec = [ax if n % 2 == 0 else None for ax, n in zip(("a", "b"), s.shape, strict=False)]
        return NamedSharding(mesh_c, P(*spec))

    target = jax.tree.map(pick_c, weight_specs(cfg))
    _, w2 = restore(out, target)
    for k, a in flatten(w2._asdict()).items():
        assert {d.id for d in a.sharding.device_set} == {d.id for d in jax.devices()[4:]}, k
        np.testing.assert_array_equal(np.asarray(a), np.asarray(flatten(w._asdict())[k]), err_msg=k)


def test_default_restore_is_single_device_and_load_model_detects_format(tmp_path: Path) -> None:
    _, w, out = _save_sharded_on_4(tmp_path)
    m = load_model(out)
    assert isinstance(m.weights.attn["embed"].sharding, SingleDeviceSharding)
    np.testing.assert_array_equal(np.asarray(m.weights.attn["embed"]), np.asarray(w.attn["embed"]))
    assert m.tokenizer is not None and m.tokenizer.encode("w3 w5") == [3, 5]
    hf = load_model(FIXTURES / CASE)
    assert hf.config == m.config
    np.testing.assert_array_equal(
        np.asarray(hf.weights.ffn["moe"]["w_down"]), np.asarray(w.ffn["moe"]["w_down"])
    )


def test_uncompressed_round_trip(tmp_path: Path) -> None:
    """`save(compress=False)`: raw arrays (larger on disk), restored bit for bit by the same reader,
    as JAX arrays or (`numpy=True`) as numpy arrays."""
    cfg, w = load_hf(FIXTURES / CASE)
    save(tmp_path / "raw", cfg, w, compress=False)
    save(tmp_path / "zstd", cfg, w)
    assert restore(tmp_path / "raw")[0] == cfg
    want = flatten({"attn": w.attn, "ffn": w.ffn})
    for path in ("raw", "zstd"):  # numpy=True: host numpy arrays, the same values (HF import too)
        for numpy in (False, True):
            got = restore(tmp_path / path, numpy=numpy)[1]
            have = flatten({"attn": got.attn, "ffn": got.ffn})
            assert want.keys() == have.keys()
            for k, a in want.items():
                assert isinstance(have[k], np.ndarray) == numpy, k
                assert have[k].dtype == a.dtype, k
                np.testing.assert_array_equal(np.asarray(a), np.asarray(have[k]), err_msg=k)
    hf = load_model(FIXTURES / CASE, numpy=True).weights
    for k, a in flatten({"attn": hf.attn, "ffn": hf.ffn}).items():
        assert isinstance(a, np.ndarray) and a.dtype == want[k].dtype, k
        np.testing.assert_array_equal(np.asarray(want[k]), a, err_msg=k)

    def size(d: Path) -> int:
        return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())

    assert size(tmp_path / "raw") > size(tmp_path / "zstd")


def test_restore_with_dtype_cast(tmp_path: Path) -> None:
    _, w, out = _save_sharded_on_4(tmp_path)
    cfg, w16 = restore(out, dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and w16.attn["embed"].dtype == jax.numpy.bfloat16
    np.testing.assert_array_equal(
        np.asarray(w16.attn["embed"]), np.asarray(w.attn["embed"]).astype(jax.numpy.bfloat16)
    )


def test_broken_directories(tmp_path: Path) -> None:
    _, _, out = _save_sharded_on_4(tmp_path)
    with pytest.raises(CheckpointError, match=r"weights: already exists"):
        save(out, *load_hf(FIXTURES / CASE))
    no_weights = tmp_path / "no_weights"
    shutil.copytree(out, no_weights)
    shutil.rmtree(no_weights / "weights")
    with pytest.raises(CheckpointError, match=r"no_weights/weights: missing"):
        restore(no_weights)
    bad_cfg = tmp_path / "bad_cfg"
    shutil.copytree(out, bad_cfg)
    (bad_cfg / "crosspool_config.json").write_text("{not json")
    with pytest.raises(
        CheckpointError, match=r"bad_cfg/crosspool_config\.json: not a valid crosspool config"
    ):
        restore(bad_cfg)
    wrong = tmp_path / "wrong_cfg"
    shutil.copytree(out, wrong)
    d = json.loads((wrong / "crosspool_config.json").read_text())
    d["hidden_size"] += 8  # config no longer matches the stored arrays
    (wrong / "crosspool_config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"wrong_cfg/weights: cannot restore weights"):
        restore(wrong)
    with pytest.raises(CheckpointError, match=r"neither an HF model directory"):
        load_model(tmp_path)


def test_byte_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo, wörld")
    assert all(0 <= i < 256 for i in ids) and tok.vocab_size == 258
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "héllo, wörld"
