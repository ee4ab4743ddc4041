"""`crosspool convert`: exit 0 and restorable output; one-line errors, exit 2 (in-process and subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from checkpoints.hf_import import load_hf
from checkpoints.orbax_format import restore
from crosspool_jax.models.params import flatten
from serving.cli import main

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / ".cache" / "hf_fixtures"
CASE = "dsv3_bf16_first2dense_shared2_top8"
pytestmark = pytest.mark.skipif(not (FIXTURES / CASE).is_dir(), reason="run `bash scripts/fixtures.sh`")


def test_convert_then_restore(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["convert", "--hf", str(FIXTURES / CASE), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "convert: loaded deepseek_v3" in err and "convert: done" in err
    cfg, w = restore(out)
    cfg_hf, w_hf = load_hf(FIXTURES / CASE)
    assert cfg == cfg_hf and cfg.dtype == "bfloat16"
    for k, a in flatten(w._asdict()).items():
        b = flatten(w_hf._asdict())[k]
        assert a.dtype == b.dtype, k
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=k)


def test_convert_with_dtype_and_tokenizer(tmp_path: Path) -> None:
    case = "qwen2moe_gqa6x2_top2_shared40"
    out = tmp_path / "out"
    assert main(["convert", "--hf", str(FIXTURES / case), "--out", str(out), "--dtype", "bfloat16"]) == 0
    cfg, w = restore(out)
    assert cfg.dtype == "bfloat16" and w.ffn["moe"]["w_gate_up"].dtype == np.dtype("bfloat16")
    assert (out / "tokenizer.json").read_bytes() == (FIXTURES / case / "tokenizer.json").read_bytes()


def _one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) >= 1 and "Traceback" not in err
    assert lines[-1].startswith("crosspool: error: ")
    return lines[-1]


def test_convert_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / CASE, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "gpt_oss", ["GptOssForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["convert", "--hf", str(bad), "--out", str(tmp_path / "o1")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "unknown architecture" in line and "config.json" in line

    trunc = tmp_path / "trunc"
    shutil.copytree(FIXTURES / CASE, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) - 100])
    assert main(["convert", "--hf", str(trunc), "--out", str(tmp_path / "o2")]) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "trunc/model.safetensors" in line and "truncated" in line
    assert not (tmp_path / "o2").exists()

    assert main(["convert", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "o3")]) == 2
    assert "config.json: not found" in _one_line_error(capsys.readouterr().err)


def test_generate_is_parsed_and_handed_off(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "x", "--prompt-ids", "1,a"])
    assert e.value.code == 2  # argparse usage error


def test_subprocess_error_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(FIXTURES / CASE, bad)
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[:64])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "convert",
            "--hf",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 2
    line = _one_line_error(proc.stderr)
    assert "bad/model.safetensors" in line
