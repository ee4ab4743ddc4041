"""TLS (a self-signed certificate made here with the `openssl` binary), the `crosspool serve` config
file and flags (serving/settings.py), and the engine choice by mode (`make_engine`)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import textwrap

import grpc
import jax
import pytest

from crosspool_jax.engine import EngineConfig
from serving import settings as settings_mod
from serving.cli import build_parser, main, serve_settings
from serving.client import CrossPoolClient
from serving.crosspool.v1 import crosspool_pb2 as pb
from serving.crosspool.v1 import crosspool_pb2_grpc as pb_grpc
from serving.server import demo_engine, start_server
from serving.settings import (
    CONFIG_KEYS,
    ENGINE_CHECKS,
    LIMIT_CHECKS,
    ServeSettings,
    SettingsError,
    build_settings,
    load_config,
    make_engine,
    resolve_mode,
)
from serving.tls import TLSError, server_credentials

NAME = "demo-mixtral"
ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "serving" / "example_config.toml"


def _self_signed(d: pathlib.Path, stem: str) -> tuple[str, str]:
    cert, key = d / f"{stem}.pem", d / f"{stem}.key"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("no `openssl` binary (and no `cryptography` package) to make a self-signed certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(d, "server")
    other_cert, other_key = _self_signed(d, "other")
    garbage = d / "garbage.pem"
    garbage.write_text("not a certificate\n")
    return dict(cert=cert, key=key, other_cert=other_cert, other_key=other_key, garbage=str(garbage))


@pytest.fixture(scope="module")
def tls_server(certs):
    s = start_server(
        demo_engine(max_live_requests=4, names=[NAME]), port=0, tls_cert=certs["cert"], tls_key=certs["key"]
    )
    yield s
    s.stop(grace=0)


# ---- TLS -------------------------------------------------------------------------------------------


def test_tls_client_works_plaintext_fails(tls_server, certs):
    assert tls_server.tls
    with CrossPoolClient(tls_server.address, tls_ca=certs["cert"]) as c:
        assert [m.name for m in c.list_models()] == [NAME]
        out = c.generate(NAME, prompt="hi", max_new_tokens=3, ignore_eos=True)
        assert len(out["token_ids"]) == 3 and out["finish_reason"] == "length"
    # plaintext, and TLS trusting the wrong CA, both fail to connect
    for kw in ({}, {"tls_ca": certs["other_cert"]}):
        with CrossPoolClient(tls_server.address, **kw) as c:
            with pytest.raises(grpc.RpcError) as ei:
                c.stub.ListModels(pb.ListModelsRequest(), timeout=10)
            assert ei.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_with_auth_token(certs):
    s = start_server(
        demo_engine(max_live_requests=2, names=[NAME]),
        port=0,
        auth_token="s3cret",
        tls_cert=certs["cert"],
        tls_key=certs["key"],
    )
    try:
        with CrossPoolClient(s.address, tls_ca=certs["cert"]) as anon:
            with pytest.raises(grpc.RpcError) as ei:
                anon.list_models()
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with CrossPoolClient(s.address, tls_ca=certs["cert"], auth_token="s3cret") as c:
            assert [m.name for m in c.list_models()] == [NAME]
    finally:
        s.stop(grace=0)


def test_cli_generate_tls(tls_server, certs, capsys):
    import json

    base = ["generate", "--server", tls_server.address, "--model", NAME, "--prompt-ids", "1,2"]
    assert main([*base, "--max-new-tokens", "2", "--tls-ca", certs["cert"]]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(line["token_ids"]) <= 2
    assert main(base) == 2  # plaintext against a TLS server
    err = capsys.readouterr().err.strip()
    assert "UNAVAILABLE" in err and "--tls-ca" in err and len(err.splitlines()) == 1
    for bad, why in (("/nonexistent/ca.pem", "cannot read"), (certs["garbage"], "not a PEM certificate")):
        assert main([*base, "--tls-ca", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("crosspool: error: --tls-ca") and why in err and len(err.splitlines()) == 1


def test_bad_tls_files(certs, capfd):
    with pytest.raises(TLSError, match=r"--tls-cert /nonexistent\.pem: cannot read"):
        server_credentials("/nonexistent.pem", certs["key"])
    with pytest.raises(TLSError, match="not a PEM certificate"):
        server_credentials(certs["garbage"], certs["key"])
    with pytest.raises(TLSError, match=r"--tls-key .*: not a PEM private key"):
        server_credentials(certs["cert"], certs["cert"])
    with pytest.raises(TLSError, match="refused the pair"):
        server_credentials(certs["cert"], certs["other_key"])  # the key of another certificate
    capfd.readouterr()
    # the CLI: one line on stderr (gRPC's own log of the refused key included), exit 2, before any model
    for cert, key, why in (
        ("/nonexistent.pem", certs["key"], "cannot read"),
        (certs["cert"], certs["other_key"], "refused the pair"),
        (certs["cert"], None, "needs both"),
    ):
        argv = ["serve", "--port", "0", "--tls-cert", cert] + (["--tls-key", key] if key else [])
        assert main(argv) == 2
        out, err = capfd.readouterr()
        assert err.startswith("crosspool: error: ") and why in err and len(err.strip().splitlines()) == 1
        assert "serving on" not in out
    with pytest.raises(TLSError, match="needs both"):
        start_server(object(), port=0, tls_cert=certs["cert"])


# ---- config file and flags -------------------------------------------------------------------------


def test_example_config_loads_and_names_every_key():
    cfg = load_config(str(EXAMPLE))
    s = build_settings(cfg)
    assert (s.host, s.port, s.max_live_requests, s.grace, s.metrics_port) == (
        "127.0.0.1",
        50051,
        64,
        10.0,
        9100,
    )
    assert s.mode == "auto" and s.demo is True and s.load_demo and s.models == {} and not s.tls
    assert s.warmup is True and s.engine == {}
    text = EXAMPLE.read_text()
    for key in CONFIG_KEYS:  # every key is shown (set or commented out)
        assert f"{key} =" in text or f"[{key}]" in text, key
    for key in ("cert", "key", *ENGINE_CHECKS, *LIMIT_CHECKS):
        assert f"{key} =" in text, key


def _write(tmp_path, body: str) -> str:
    p = tmp_path / "serve.toml"
    p.write_text(textwrap.dedent(body))
    return str(p)


def test_config_values_and_relative_paths(tmp_path):
    path = _write(
        tmp_path,
        """
        host = "0.0.0.0"
        port = 6000
        max_live_requests = 8
        auth_token = "tok"
        metrics_port = 0
        grace = 3
        demo = false
        mode = "crosspool"
        pools = " 2 + 6 "
        [models]
        a = "ckpt/a"
        "b-2" = "/abs/b"
        [tls]
        cert = "c.pem"
        key = "/k.pem"
        """,
    )
    s = build_settings(load_config(path))
    assert (s.host, s.port, s.max_live_requests, s.auth_token, s.metrics_port) == (
        "0.0.0.0",
        6000,
        8,
        "tok",
        0,
    )
    assert s.grace == 3.0 and s.demo is False and s.mode == "crosspool" and s.pools == "2+6"
    assert s.models == {"a": str(tmp_path / "ckpt" / "a"), "b-2": "/abs/b"}
    assert (s.tls_cert, s.tls_key) == (str(tmp_path / "c.pem"), "/k.pem")


@pytest.mark.parametrize(
    "body, needle",
    [
        ("prot = 1", "unknown key 'prot'"),
        ('port = "50051"', "key 'port': must be an integer"),
        ("port = 70000", "key 'port': must be in 0..65535"),
        ("max_live_requests = 0", "key 'max_live_requests': must be >= 1"),
        ("grace = -1", "key 'grace'"),
        ("demo = 1", "key 'demo': must be true or false"),
        ('mode = "fast"', "key 'mode': must be one of auto, reference, crosspool, shared, static"),
        ('pools = "4x4"', "key 'pools': must look like KV+WEIGHTS"),
        ('pools = "0+4"', "key 'pools'"),
        ("models = 3", "key 'models': must be a table"),
        ("[models]\na = 3", "key 'models.a'"),
        ('[tls]\ncert = "c"\nchain = "x"', "unknown key 'tls.chain'"),
        ('auth_token = ""', "key 'auth_token'"),
        ("port = = 1", "not valid TOML"),
    ],
)
def test_config_errors_name_the_key(tmp_path, body, needle):
    path = _write(tmp_path, body)
    with pytest.raises(SettingsError) as ei:
        load_config(path)
    msg = str(ei.value)
    assert msg.startswith(f"config {path}: ") and needle in msg and "\n" not in msg


def test_flags_override_the_file(tmp_path):
    path = _write(
        tmp_path,
        """
        port = 6000
        mode = "static"
        pools = "4+4"
        grace = 3.0
        [models]
        a = "/ckpt/a"
        b = "/ckpt/b"
        """,
    )
    args = build_parser().parse_args(
        ["serve", "--config", path, "--port", "0", "--mode", "reference", "--model", "b=/other/b", "--demo"]
    )
    s = serve_settings(args)
    assert s.port == 0 and s.mode == "reference" and s.pools == "4+4" and s.grace == 3.0
    assert s.models == {"a": "/ckpt/a", "b": "/other/b"} and s.demo is True
    # no config: the defaults; --model turns the demo models off unless --demo
    s = serve_settings(build_parser().parse_args(["serve", "--model", "x=/p", "--no-demo"]))
    assert s == ServeSettings(models={"x": "/p"}, demo=False)
    assert not ServeSettings(models={"x": "/p"}).load_demo and ServeSettings().load_demo


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--mode", "fast"], "--mode: must be one of auto, reference, crosspool, shared, static"),
        (["--pools", "4x4"], "--pools: must look like KV+WEIGHTS"),
        (["--port", "-1"], "--port: must be in 0..65535"),
        (["--max-live-requests", "0"], "--max-live-requests: must be >= 1"),
        (["--model", "noequals"], "--model expects NAME=PATH"),
        (["--config", "/nonexistent.toml"], "config /nonexistent.toml: cannot read"),
    ],
)
def test_serve_flag_errors(argv, needle, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"crosspool: error: {err.removeprefix('crosspool: error: ')}" and needle in err
    assert len(err.splitlines()) == 1


# ---- mode -> engine --------------------------------------------------------------------------------


def test_pooled_modes_without_the_pooled_engine(monkeypatch, capsys):
    monkeypatch.setattr(settings_mod, "POOLED_ENGINE_MODULE", "crosspool_jax._no_such_engine_module")
    for mode in ("crosspool", "shared", "static"):
        with pytest.raises(
            SettingsError, match=f"^mode {mode} needs the pooled engine \\(not available yet\\)$"
        ):
            make_engine(ServeSettings(mode=mode, pools="4+4", demo=False))
    assert main(["serve", "--port", "0", "--no-demo", "--mode", "shared"]) == 2
    assert capsys.readouterr().err.strip() == (
        "crosspool: error: mode shared needs the pooled engine (not available yet)"
    )


FAKE_POOLED = """
class PooledEngine:
    made = []

    def __init__(self, mode, pools, max_live_requests, config, devices):
        self.kw = dict(mode=mode, pools=pools, max_live_requests=max_live_requests)
        self.config, self.devices = config, devices
        self.added = []
        PooledEngine.made.append(self)

    def add_model(self, name, config, weights, tokenizer=None, source=""):
        self.added.append((name, config.family.value, source))

    def shutdown(self, timeout=None):
        pass
"""


def test_pooled_engine_is_used_when_present(tmp_path, monkeypatch):
    (tmp_path / "fake_pooled_engine_mod.py").write_text(FAKE_POOLED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(settings_mod, "POOLED_ENGINE_MODULE", "fake_pooled_engine_mod")
    engine = make_engine(ServeSettings(mode="crosspool", pools="2+6", max_live_requests=7))
    assert type(engine).__name__ == "PooledEngine"
    assert engine.kw == dict(mode="crosspool", pools="2+6", max_live_requests=7)
    assert [a[0] for a in engine.added] == ["demo-mixtral", "demo-qwen3-moe", "demo-deepseek-v3"]
    assert {a[2] for a in engine.added} == {"builtin-demo"}
    # the engine's defaults, all devices, and the plain-jnp attention on CPU (nothing set it)
    assert engine.config == EngineConfig(attention_backend="reference")
    assert engine.devices == jax.devices()
    # engine_config and devices are passed on; the settings' [engine] fields go on top of engine_config
    base = EngineConfig(arena_bytes=8 << 20, page_bytes=4096, steps_per_call=2, attention_backend="interpret")
    s = ServeSettings(mode="auto", demo=False, engine={"steps_per_call": 3, "micro_batches": 2})
    engine = make_engine(s, engine_config=base, devices=jax.devices()[:3])
    assert engine.kw["mode"] == "crosspool" and engine.devices == jax.devices()[:3]
    assert engine.config == EngineConfig(arena_bytes=8 << 20, page_bytes=4096, steps_per_call=3,
                                         micro_batches=2, attention_backend="interpret")
    engine = make_engine(ServeSettings(mode="auto", demo=False), devices=jax.devices()[:1])
    assert engine.kw["mode"] == "shared"  # one device: no pool split
    # a module without PooledEngine counts as absent
    (tmp_path / "fake_empty_engine_mod.py").write_text("X = 1\n")
    monkeypatch.setattr(settings_mod, "POOLED_ENGINE_MODULE", "fake_empty_engine_mod")
    with pytest.raises(SettingsError, match="needs the pooled engine"):
        make_engine(ServeSettings(mode="static", demo=False))


def test_engine_settings_from_file_and_flags(tmp_path):
    path = _write(
        tmp_path,
        """
        mode = "crosspool"
        pools = "1+1"
        warmup = false
        precompile_context = 4096
        load_on_request = true
        [engine]
        arena_bytes = "8MiB"
        page_bytes = 4096
        weights_fraction = 0.25
        steps_per_call = 2
        prefill_chunk = 32
        prefill_share = 0.5
        mixed_steps = true
        max_prefill_tokens = 128
        micro_batches = 2
        dtype = "float32"
        attention_backend = "reference"
        execution = "auto"
        overlap = false
        idle_sleep_s = 60
        host_weights_bytes = "2GiB"
        """,
    )
    s = build_settings(load_config(path))
    assert s.precompile_context == 4096 and s.load_on_request is True
    assert s.warmup is False and s.engine == dict(
        arena_bytes=8 << 20, page_bytes=4096, weights_fraction=0.25, steps_per_call=2, prefill_chunk=32,
        prefill_share=0.5, mixed_steps=True, max_prefill_tokens=128, micro_batches=2, dtype="float32",
        attention_backend="reference", execution="auto", overlap=False, idle_sleep_s=60.0,
        host_weights_bytes=2 << 30)
    assert s.engine_config() == EngineConfig(**s.engine)
    # flags win over the file, field by field; sizes take units
    args = build_parser().parse_args(
        ["serve", "--config", path, "--arena-bytes", "16m", "--steps-per-call", "8", "--no-warmup"]
    )
    s = serve_settings(args)
    assert s.engine["arena_bytes"] == 16 << 20 and s.engine["steps_per_call"] == 8
    assert s.engine["page_bytes"] == 4096 and s.warmup is False
    args = build_parser().parse_args(["serve", "--config", path, "--execution", "host"])
    assert serve_settings(args).engine["execution"] == "host"
    args = build_parser().parse_args(["serve", "--config", path, "--overlap"])
    assert serve_settings(args).engine["overlap"] is True
    args = build_parser().parse_args(["serve", "--config", path, "--prefill-share", "2"])
    assert serve_settings(args).engine["prefill_share"] == 2.0
    args = build_parser().parse_args(["serve", "--config", path, "--no-mixed-steps"])
    assert serve_settings(args).engine["mixed_steps"] is False
    args = build_parser().parse_args(["serve", "--config", path, "--no-admission-backfill",
                                      "--starving-after-steps", "0"])
    engine = serve_settings(args).engine
    assert engine["admission_backfill"] is False and engine["starving_after_steps"] is None
    args = build_parser().parse_args(["serve", "--config", path, "--precompile-context", "512"])
    assert serve_settings(args).precompile_context == 512
    args = build_parser().parse_args(["serve", "--config", path, "--no-load-on-request",
                                      "--host-weights-bytes", "1g"])
    assert serve_settings(args).load_on_request is False
    assert serve_settings(args).engine["host_weights_bytes"] == 1 << 30
    assert serve_settings(build_parser().parse_args(["serve"])).engine == {}


@pytest.mark.parametrize(
    "body, needle",
    [
        ("[engine]\narena = 1", "unknown key 'engine.arena' (known: arena_bytes, page_bytes"),
        ('[engine]\narena_bytes = "lots"', "key 'engine.arena_bytes': must be a byte count"),
        ("[engine]\npage_bytes = 0", "key 'engine.page_bytes': must be >= 1 byte"),
        ("[engine]\nweights_fraction = 1.0", "key 'engine.weights_fraction': must be a number between"),
        ("[engine]\nsteps_per_call = 0", "key 'engine.steps_per_call': must be >= 1"),
        ("[engine]\nprefill_share = 0", "key 'engine.prefill_share': must be a number > 0"),
        ("[engine]\nstarving_after_steps = -1", "key 'engine.starving_after_steps': must be >= 0"),
        ('[engine]\nmixed_steps = "yes"', "key 'engine.mixed_steps': must be"),
        ("[engine]\nmicro_batches = 1.5", "key 'engine.micro_batches': must be an integer"),
        ('[engine]\ndtype = "int8"', "key 'engine.dtype': must be one of float32, bfloat16, float16"),
        ('[engine]\nattention_backend = "cuda"', "key 'engine.attention_backend': must be one of gpu"),
        ('[engine]\nexecution = "fast"', "key 'engine.execution': must be one of lowered, host, auto"),
        ('[engine]\noverlap = "yes"', "key 'engine.overlap': must be"),
        ("engine = 3", "key 'engine': must be a table"),
        ('warmup = "yes"', "key 'warmup': must be true or false"),
        ("precompile_context = -1", "key 'precompile_context': must be >= 0"),
    ],
)
def test_engine_config_errors_name_the_key(tmp_path, body, needle):
    path = _write(tmp_path, body)
    with pytest.raises(SettingsError) as ei:
        load_config(path)
    assert str(ei.value).startswith(f"config {path}: ") and needle in str(ei.value)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--arena-bytes", "12 parsecs"], "--arena-bytes: must be a byte count"),
        (["--weights-fraction", "0"], "--weights-fraction: must be a number between 0 and 1"),
        (["--prefill-chunk", "0"], "--prefill-chunk: must be >= 1"),
        (["--prefill-share", "-1"], "--prefill-share: must be a number > 0"),
        (["--dtype", "int4"], "--dtype: must be one of float32, bfloat16, float16"),
        (["--mode", "crosspool", "--pools", "4"], "mode crosspool: pools must be KV+WEIGHTS"),
        (["--mode", "shared", "--pools", "4+4"], "mode shared: pools is the number of devices to use"),
        (["--mode", "crosspool", "--pools", "8+1"], "mode crosspool: pools 8+1 needs 9 devices, found 8 cpu"),
        (["--mode", "static", "--pools", "9"], "mode static: pools 9 is more than the 8 cpu devices"),
        (["--page-bytes", "1000"], "mode crosspool: the engine refused its settings: page_bytes 1000"),
    ],
)
def test_engine_flag_errors(argv, needle, capsys):
    assert main(["serve", "--port", "0", "--no-demo", "--no-warmup", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("crosspool: error: ") and needle in err[-1], err


def test_resolve_mode():
    devs = jax.devices()
    assert resolve_mode(ServeSettings(), devs[:2]) == (
        "crosspool", "mode auto: crosspool on 2 cpu devices (KV pool + weights pool)")
    mode, why = resolve_mode(ServeSettings(), devs[:1])
    assert mode == "shared" and "1 cpu device cannot be split" in why
    assert resolve_mode(ServeSettings(mode="static", pools="3"), devs) == ("static", None)
    assert resolve_mode(ServeSettings(mode="reference", pools="4+4"), devs[:1]) == ("reference", None)
    with pytest.raises(SettingsError, match=r"^mode crosspool needs at least 2 devices .* 1 cpu device;"):
        resolve_mode(ServeSettings(mode="crosspool"), devs[:1])


def test_make_engine_builds_the_pooled_engine():
    """The real PooledEngine from settings: the given devices, EngineConfig from the settings, and
    GetStats' reports (mode, topology, KV pages, weights per model) on it."""
    from serving.stats import snapshot

    s = ServeSettings(mode="auto", engine={"arena_bytes": 4 << 20, "page_bytes": 8192}, demo=True)
    logs = []
    engine = make_engine(s, log=logs.append, devices=jax.devices()[:2])
    try:
        assert engine.mode == "crosspool" and engine.pools == "1+1"
        assert engine.config.arena_bytes == 4 << 20 and engine.config.page_bytes == 8192
        assert logs[0] == "serve: mode auto: crosspool on 2 cpu devices (KV pool + weights pool)"
        placed = [x for x in logs if x.startswith("serve: placed ")]
        assert [x.split()[2] for x in placed] == ["demo-mixtral", "demo-qwen3-moe", "demo-deepseek-v3"]
        snap = snapshot(engine)
        assert snap.mode == "crosspool"
        assert snap.topology.startswith("mode crosspool: 1+1 (kv: 0; weights: 1)")
        assert snap.stats.kv_pages == (("cpu:0", 0, engine.groups[0].kv.config.total_pages),)
        assert [w.model for w in snap.weights] == list(snap.stats.models)
        for w in snap.weights:  # attention side on the KV device, FFN side on the weights device
            assert w.attention_bytes > 0 and w.ffn_bytes > 0 and w.bytes == engine.weights_bytes(w.model)
    finally:
        engine.shutdown(timeout=0)


def test_load_on_request_registers_models_on_disk(tmp_path):
    """`load_on_request`: configured checkpoints are registered on disk (not read, not warmed up)
    and the first request loads one; its tokens equal the reference's."""
    from checkpoints import save
    from crosspool_jax.demo import demo_models
    from crosspool_jax.engine_api import make_request
    from crosspool_jax.models.reference import ReferenceGenerator
    from serving.warmup import warm_up

    m = demo_models()["demo-mixtral"]
    save(tmp_path / "ckpt", m.config, m.weights)
    s = ServeSettings(mode="shared", pools="1", demo=False, models={"mix": str(tmp_path / "ckpt")},
                      load_on_request=True, engine={"arena_bytes": 8 << 20})
    logs: list[str] = []
    engine = make_engine(s, log=logs.append, devices=jax.devices()[:1])
    try:
        assert "serve: registered mix on disk (loaded at its first request)" in logs
        assert dict(engine.stats().model_states) == {"mix": "on_disk"}
        assert warm_up(engine, log=logs.append) == [] and "not resident" in logs[-1]
        h = engine.submit(make_request("mix", [5, 9, 33, 7], 5))
        got = [ev.token_id for ev in h.events() if ev.token_id is not None]
        assert got == list(ReferenceGenerator(m.config, m.weights).generate([5, 9, 33, 7], 5).token_ids)
        assert dict(engine.stats().model_states) == {"mix": "resident"}
    finally:
        engine.shutdown(timeout=0)


def test_reference_mode_engine(capsys):
    logs = []
    engine = make_engine(ServeSettings(mode="reference", pools="4+4"), log=logs.append)
    try:
        names = ["demo-mixtral", "demo-qwen3-moe", "demo-deepseek-v3"]
        assert [m.name for m in engine.list_models()] == names
        assert logs[0] == "serve: pools '4+4' are ignored in mode reference"
        assert [x.split()[2] for x in logs[1:]] == names
        assert all(x.startswith("serve: loaded ") for x in logs[1:])
    finally:
        engine.shutdown(timeout=0)


def test_serve_cli_from_config_with_tls(certs, tmp_path):
    """`crosspool serve --config` end to end in a subprocess: TLS paths relative to the file, a flag
    overriding the file's port, SIGTERM drains and exits 0."""
    import signal
    import sys
    import time

    shutil.copy(certs["cert"], tmp_path / "server.pem")
    shutil.copy(certs["key"], tmp_path / "server.key")
    path = _write(
        tmp_path,
        """
        port = 1
        max_live_requests = 2
        grace = 1
        mode = "reference"
        [tls]
        cert = "server.pem"
        key = "server.key"
        """,
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "serving.cli", "serve", "--config", path, "--port", "0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving on 127.0.0.1:" in line and "mode reference, TLS" in line, line + proc.stderr.read()
        addr = line.split("serving on ")[1].split()[0]
        with CrossPoolClient(addr, tls_ca=certs["cert"]) as c:
            assert {m.name for m in c.list_models()} == {NAME, "demo-qwen3-moe", "demo-deepseek-v3"}
            assert c.stats().max_live_requests == 2
        with CrossPoolClient(addr) as c, pytest.raises(grpc.RpcError):
            pb_grpc.CrossPoolStub(c.channel).ListModels(pb.ListModelsRequest(), timeout=10)
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0 and time.time() - t0 < 30
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
