"""`crosspool serve` settings: defaults < a TOML config file (`--config`) < command-line flags, and
`make_engine(settings)`, the one place that picks and fills the engine.

Config file keys are the serve flags with `_` for `-` (see serving/example_config.toml):

    host = "127.0.0.1"          port = 50051            max_live_requests = 64
    auth_token = "..."          metrics_port = 9100     grace = 10.0
    demo = false                mode = "reference"      pools = "4+4"
    [models]                    # name = path (an HF directory or a crosspool checkpoint)
    mine = "/ckpt/mine"
    [tls]
    cert = "server.pem"
    key = "server.key"

Relative paths in the file (models, tls.cert, tls.key) are taken relative to the file's directory.
An unknown key or a bad value is a `SettingsError` naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import tomllib
from collections.abc import Callable
from typing import Any

from crosspool_jax.errors import CrossPoolError

MODES = ("reference", "crosspool", "shared", "static")
POOLED_MODES = ("crosspool", "shared", "static")
POOLED_ENGINE_MODULE = "crosspool_jax.engine"


class SettingsError(CrossPoolError, ValueError):
    """A bad serve setting (config file or flag); the message names the key or flag."""


@dataclasses.dataclass
class ServeSettings:
    """Everything `crosspool serve` needs. `demo=None`: the demo models unless `models` are given."""

    host: str = "127.0.0.1"
    port: int = 50051
    models: dict[str, str] = dataclasses.field(default_factory=dict)
    demo: bool | None = None
    max_live_requests: int = 64
    auth_token: str | None = None
    metrics_port: int | None = None
    grace: float = 10.0
    tls_cert: str | None = None
    tls_key: str | None = None
    mode: str = "reference"
    pools: str | None = None

    @property
    def load_demo(self) -> bool:
        return self.demo if self.demo is not None else not self.models

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert or self.tls_key)


# ---- value checks (each returns the normalized value or raises ValueError with the reason) -----------


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be an integer, got {v!r}")
        if v < lo or (hi is not None and v > hi):
            raise ValueError(
                f"must be in {lo}..{hi}, got {v}" if hi is not None else f"must be >= {lo}, got {v}"
            )
        return v

    return check


def _str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"must be a non-empty string, got {v!r}")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, got {v!r}")
    return v


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ValueError(f"must be a number of seconds >= 0, got {v!r}")
    return float(v)


def _mode(v: Any) -> str:
    if v not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}, got {v!r}")
    return str(v)


def _pools(v: Any) -> str:
    m = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*", v) if isinstance(v, str) else None
    if m is None or int(m[1]) < 1 or int(m[2]) < 1:
        raise ValueError(f'must look like KV+WEIGHTS device counts, each >= 1 (e.g. "4+4"), got {v!r}')
    return f"{int(m[1])}+{int(m[2])}"


CHECKS: dict[str, Callable[[Any], Any]] = {
    "host": _str,
    "port": _int(0, 65535),
    "demo": _bool,
    "max_live_requests": _int(1),
    "auth_token": _str,
    "metrics_port": _int(0, 65535),
    "grace": _seconds,
    "mode": _mode,
    "pools": _pools,
}
TABLES = ("models", "tls")
TLS_KEYS = {"cert": "tls_cert", "key": "tls_key"}
CONFIG_KEYS = (*CHECKS, *TABLES)


def check_value(key: str, value: Any, where: str) -> Any:
    """`value` checked/normalized for the setting `key`; `where` names it in the error (a flag, or a
    config file's key)."""
    try:
        return CHECKS[key](value)
    except ValueError as e:
        raise SettingsError(f"{where}: {e}") from None


def parse_model_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SettingsError(f"--model expects NAME=PATH, got {spec!r}")
    return name, path


def load_config(path: str) -> dict[str, Any]:
    """The settings in the TOML file `path`, as ServeSettings field -> value (only the keys present),
    checked; relative paths resolved against the file's directory."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise SettingsError(f"config {path}: cannot read: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"config {path}: not valid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p: str) -> str:
        p = os.path.expanduser(p)
        return p if os.path.isabs(p) else os.path.join(base, p)

    out: dict[str, Any] = {}
    for key, value in raw.items():
        where = f"config {path}: key {key!r}"
        if key in CHECKS:
            out[key] = check_value(key, value, where)
        elif key == "models":
            if not isinstance(value, dict):
                raise SettingsError(f'{where}: must be a table of name = "path" (e.g. [models])')
            models = {}
            for name, p in value.items():
                if not name or not isinstance(p, str) or not p.strip():
                    raise SettingsError(
                        f"config {path}: key 'models.{name}': must be a checkpoint path string, got {p!r}"
                    )
                models[name] = resolve(p)
            out["models"] = models
        elif key == "tls":
            if not isinstance(value, dict):
                raise SettingsError(f"{where}: must be a table with cert and key (e.g. [tls])")
            for sub, p in value.items():
                if sub not in TLS_KEYS:
                    raise SettingsError(
                        f"config {path}: unknown key 'tls.{sub}' (known: {', '.join(TLS_KEYS)})"
                    )
                if not isinstance(p, str) or not p.strip():
                    raise SettingsError(f"config {path}: key 'tls.{sub}': must be a file path, got {p!r}")
                out[TLS_KEYS[sub]] = resolve(p)
        else:
            raise SettingsError(f"config {path}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})")
    return out


def build_settings(
    config: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> ServeSettings:
    """Defaults, then `config` (from load_config), then `overrides` (command-line values; None means
    "not given"). Models merge by name, the command line winning. Checks the result as a whole."""
    s = ServeSettings()
    for layer in (config or {}, overrides or {}):
        for key, value in layer.items():
            if value is None:
                continue
            if key == "models":
                s.models = {**s.models, **value}
            else:
                setattr(s, key, value)
    if bool(s.tls_cert) != bool(s.tls_key):
        raise SettingsError(
            "TLS needs both a certificate (--tls-cert / tls.cert) and a key (--tls-key / tls.key)"
        )
    return s


# ---- the engine ------------------------------------------------------------------------------------


def pooled_engine_class() -> Any:
    """`crosspool_jax.engine.PooledEngine` when that module exists and defines it, else None."""
    if importlib.util.find_spec(POOLED_ENGINE_MODULE) is None:
        return None
    try:
        mod = importlib.import_module(POOLED_ENGINE_MODULE)
    except Exception as e:
        msg = " ".join(str(e).split())
        raise SettingsError(f"{POOLED_ENGINE_MODULE} failed to import: {type(e).__name__}: {msg}") from None
    return getattr(mod, "PooledEngine", None)


def make_engine(settings: ServeSettings, log: Callable[[str], None] | None = None) -> Any:
    """The engine `settings` ask for, with its models added: the demo models (unless turned off or
    `models` are given; a configured model wins over a demo of the same name), then each
    `models` checkpoint, all through `add_model(name, config, weights, tokenizer, source)`.

    mode "reference": serving.server.ServingEngine. Other modes: `PooledEngine(mode=, pools=,
    max_live_requests=)` from crosspool_jax.engine, or a SettingsError while it does not exist. The
    server also calls `tokenizer(name)` and `model_eos_ids(name)` (and `weights_bytes(name)` for the
    metrics, when present) on the engine."""
    log = log or (lambda msg: None)
    if settings.mode == "reference":
        from serving.server import ServingEngine

        if settings.pools:
            log(f"serve: pools {settings.pools!r} are ignored in mode reference")
        engine = ServingEngine(max_live_requests=settings.max_live_requests)
    else:
        cls = pooled_engine_class()
        if cls is None:
            raise SettingsError(f"mode {settings.mode} needs the pooled engine (not available yet)")
        engine = cls(mode=settings.mode, pools=settings.pools, max_live_requests=settings.max_live_requests)
    try:
        if settings.load_demo:
            from crosspool_jax.demo import demo_models

            for name, m in demo_models().items():
                if name not in settings.models:
                    engine.add_model(name, m.config, m.weights, m.tokenizer, source="builtin-demo")
        if settings.models:
            from checkpoints import load_model  # local import: checkpoints pulls in orbax

            for name, path in settings.models.items():
                log(f"serve: loading {name} from {path}")
                if settings.mode != "reference":  # the pooled engine loads to host, then places
                    engine.load_model(name, path)
                    continue
                m = load_model(path)
                engine.add_model(name, m.config, m.weights, m.tokenizer, source=str(path))
    except BaseException:
        engine.shutdown(timeout=0)
        raise
    return engine
