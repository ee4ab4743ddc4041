"""`crosspool serve` settings: defaults < a TOML config file (`--config`) < command-line flags, and
`make_engine(settings)`, the one place that picks and fills the engine.

Config file keys are the serve flags with `_` for `-` (see serving/example_config.toml):

    host = "127.0.0.1"          port = 50051            max_live_requests = 64
    auth_token = "..."          metrics_port = 9100     grace = 10.0
    demo = false                mode = "auto"           pools = "4+4"
    warmup = true               load_on_request = false
    [models]                    # name = path (an HF directory or a crosspool checkpoint)
    mine = "/ckpt/mine"
    [engine]                    # crosspool_jax.engine.EngineConfig fields (pooled modes)
    arena_bytes = "64MiB"       page_bytes = 16384      weights_fraction = 0.5
    steps_per_call = 4          prefill_chunk = 64      max_prefill_tokens = 512
    prefill_share = 0.8          mixed_steps = false     compile_process = true  # default: GPU on
    compile_workers = 4          # default: 4 per engine on GPU, shared among its groups; else 1
    micro_batches = 1           dtype = "float32"       attention_backend = "reference"
    attention_kernels = "auto"
    execution = "lowered"       overlap = true          idle_sleep_s = 600
    host_weights_bytes = "32GiB"
    admission_backfill = true   starving_after_steps = 20  # 0: never
    [limits]                    # serving.limits.RequestLimits fields: what one request may cost
    max_request_id_bytes = 128  max_prompt_bytes = "1MiB"   max_stop_token_ids = 16  ...
    [tls]
    cert = "server.pem"
    key = "server.key"
    [http]                      # the OpenAI-compatible HTTP API (serving/openai_api.py); absent: off
    port = 8000                 # 0: a free port
    host = "127.0.0.1"          # default: the gRPC host

Relative paths in the file (models, tls.cert, tls.key) are taken relative to the file's directory.
An unknown key or a bad value is a `SettingsError` naming the file and the key.

Mode "auto" (the default) is the pooled engine: `crosspool` (KV pool + weights pool) when there are
at least 2 devices, else `shared` on the one device (the reason is logged).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import re
import time
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from crosspool_jax.errors import CrossPoolError

MODES = ("auto", "reference", "crosspool", "shared", "static")
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
    http_port: int | None = None  # the OpenAI-compatible HTTP API's port (None: off; 0: a free port)
    http_host: str | None = None  # its listen address (None: `host`)
    mode: str = "auto"
    pools: str | None = None
    # EngineConfig fields set by the file's [engine] table or the flags (the rest keep the engine's
    # defaults); pooled modes only
    engine: dict[str, Any] = dataclasses.field(default_factory=dict)
    warmup: bool | None = None  # compile the common step programs before serving (None: pooled modes)
    # pooled modes: register `models` on disk (config, tokenizer) and load each at its first request
    load_on_request: bool = False
    # > 0: before serving, also compile every one-lane step program for requests up to this many
    # tokens (PooledEngine.precompile; pooled modes); 0: off
    precompile_context: int = 0
    # serving.limits.RequestLimits fields set by the file's [limits] table or the flags
    limits: dict[str, int] = dataclasses.field(default_factory=dict)

    def request_limits(self) -> Any:
        """`serving.limits.RequestLimits`: the defaults with the fields this settings object sets."""
        from serving.limits import RequestLimits

        return RequestLimits(**self.limits)

    @property
    def load_demo(self) -> bool:
        return self.demo if self.demo is not None else not self.models

    def engine_config(self, base: Any = None) -> Any:
        """`crosspool_jax.engine.EngineConfig`: `base` (default: the engine's defaults) with the
        fields this settings object sets."""
        from crosspool_jax.engine import EngineConfig

        return dataclasses.replace(base if base is not None else EngineConfig(), **self.engine)

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


def _steps_or_never(v: Any) -> int | None:
    """A step count >= 1, or 0 for never (None)."""
    return _int(0)(v) or None


def _seconds(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise ValueError(f"must be a number of seconds >= 0, got {v!r}")
    return float(v)


def _mode(v: Any) -> str:
    if v not in MODES:
        raise ValueError(f"must be one of {', '.join(MODES)}, got {v!r}")
    return str(v)


def _pools(v: Any) -> str:
    """"KV+WEIGHTS" (mode crosspool) or "N" (shared/static: devices to use)."""
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)
    m = re.fullmatch(r"\s*(\d+)\s*\+\s*(\d+)\s*", v) if isinstance(v, str) else None
    if m is not None and int(m[1]) >= 1 and int(m[2]) >= 1:
        return f"{int(m[1])}+{int(m[2])}"
    n = re.fullmatch(r"\s*(\d+)\s*", v) if isinstance(v, str) else None
    if n is not None and int(n[1]) >= 1:
        return str(int(n[1]))
    raise ValueError(
        f'must look like KV+WEIGHTS device counts, each >= 1 (e.g. "4+4", mode crosspool), '
        f'or a device count N >= 1 (shared/static), got {v!r}'
    )


_SIZE = re.compile(r"\s*(\d+)\s*(|b|k|kb|kib|m|mb|mib|g|gb|gib)\s*", re.IGNORECASE)
_UNIT = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20,
         "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def _bytes(v: Any) -> int:
    """A byte count: an integer, or a string like "64MiB" / "512k" / "2G" (powers of 1024)."""
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and (m := _SIZE.fullmatch(v)):
        n = int(m[1]) * _UNIT[m[2].lower()]
    else:
        raise ValueError(f'must be a byte count (an integer, or e.g. "64MiB", "512KiB", "2GiB"), got {v!r}')
    if n < 1:
        raise ValueError(f"must be >= 1 byte, got {v!r}")
    return n


def _positive(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise ValueError(f"must be a number > 0, got {v!r}")
    return float(v)


def _fraction(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v < 1:
        raise ValueError(f"must be a number between 0 and 1 (exclusive), got {v!r}")
    return float(v)


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}, got {v!r}")
        return str(v)

    return check


ATTENTION_BACKENDS = ("gpu", "tpu", "interpret", "tpu_interpret", "reference")  # pallas_kernels BACKENDS
ATTENTION_KERNELS = ("auto", "triton", "mosaic")  # pallas_kernels.dispatch.ATTENTION_KERNELS
DTYPES = ("float32", "bfloat16", "float16")
EXECUTIONS = ("lowered", "host", "auto")  # crosspool_jax.execution.host_step.EXECUTIONS (kept import-light)


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
    "warmup": _bool,
    "load_on_request": _bool,
    "precompile_context": _int(0),
}
# the [engine] table / engine flags: crosspool_jax.engine.EngineConfig fields
ENGINE_CHECKS: dict[str, Callable[[Any], Any]] = {
    "arena_bytes": _bytes,
    "page_bytes": _bytes,
    "weights_fraction": _fraction,
    "steps_per_call": _int(1),
    "prefill_chunk": _int(1),
    "max_prefill_tokens": _int(1),
    "prefill_share": _positive,
    "mixed_steps": _bool,
    "compile_process": _bool,
    "compile_workers": _int(1),
    "micro_batches": _int(1),
    "dtype": _choice(DTYPES),
    "attention_backend": _choice(ATTENTION_BACKENDS),
    "attention_kernels": _choice(ATTENTION_KERNELS),
    "execution": _choice(EXECUTIONS),
    "overlap": _bool,
    "idle_sleep_s": _seconds,
    "host_weights_bytes": _bytes,
    "admission_backfill": _bool,
    "starving_after_steps": _steps_or_never,
}
# the [limits] table / limit flags: serving.limits.RequestLimits fields (counts, or byte sizes)
LIMIT_CHECKS: dict[str, Callable[[Any], Any]] = {
    "max_request_id_bytes": _bytes,
    "max_model_name_bytes": _bytes,
    "max_path_bytes": _bytes,
    "max_prompt_bytes": _bytes,
    "max_prompt_tokens": _int(1),
    "max_new_tokens": _int(1),
    "max_stop_token_ids": _int(1, 1024),
    "max_stop_strings": _int(1),
    "max_stop_string_bytes": _bytes,
}
TABLES = ("models", "engine", "limits", "tls", "http")
TLS_KEYS = {"cert": "tls_cert", "key": "tls_key"}
HTTP_KEYS = {"port": ("http_port", _int(0, 65535)), "host": ("http_host", _str)}
CONFIG_KEYS = (*CHECKS, *TABLES)


def check_value(key: str, value: Any, where: str) -> Any:
    """`value` checked/normalized for the setting `key`; `where` names it in the error (a flag, or a
    config file's key)."""
    try:
        return CHECKS[key](value)
    except ValueError as e:
        raise SettingsError(f"{where}: {e}") from None


def check_engine_value(key: str, value: Any, where: str) -> Any:
    """`value` checked/normalized for the EngineConfig field `key` (an [engine] key or its flag)."""
    try:
        return ENGINE_CHECKS[key](value)
    except ValueError as e:
        raise SettingsError(f"{where}: {e}") from None


def check_limit_value(key: str, value: Any, where: str) -> Any:
    """`value` checked/normalized for the RequestLimits field `key` (a [limits] key or its flag)."""
    try:
        return LIMIT_CHECKS[key](value)
    except ValueError as e:
        raise SettingsError(f"{where}: {e}") from None


def parse_model_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` -> (name, path)."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise SettingsError(f"--model expects NAME=PATH, got {spec!r}")
    return name, path


def _config_table(path: str, key: str, value: Any, known: Mapping[str, Any],
                  check: Callable[[str, Any, str], Any], what: str) -> dict[str, Any]:
    """A config file's table `key` (e.g. [engine]): each entry checked by check(sub, value, where)
    -> {sub: checked value}; SettingsError for a non-table or an unknown entry."""
    if not isinstance(value, dict):
        raise SettingsError(f"config {path}: key {key!r}: must be {what} (e.g. [{key}])")
    out = {}
    for sub, v in value.items():
        if sub not in known:
            raise SettingsError(f"config {path}: unknown key '{key}.{sub}' (known: {', '.join(known)})")
        out[sub] = check(sub, v, f"config {path}: key '{key}.{sub}'")
    return out


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
        elif key == "engine":
            out["engine"] = _config_table(path, key, value, ENGINE_CHECKS, check_engine_value,
                                          "a table of EngineConfig fields")
        elif key == "limits":
            out["limits"] = _config_table(path, key, value, LIMIT_CHECKS, check_limit_value,
                                          "a table of RequestLimits fields")
        elif key == "tls":
            def file_path(sub: str, p: Any, where: str) -> str:
                if not isinstance(p, str) or not p.strip():
                    raise SettingsError(f"{where}: must be a file path, got {p!r}")
                return resolve(p)

            tls = _config_table(path, key, value, TLS_KEYS, file_path, "a table with cert and key")
            out.update({TLS_KEYS[sub]: p for sub, p in tls.items()})
        elif key == "http":
            def http_value(sub: str, v: Any, where: str) -> Any:
                try:
                    return HTTP_KEYS[sub][1](v)
                except ValueError as e:
                    raise SettingsError(f"{where}: {e}") from None

            http = _config_table(path, key, value, HTTP_KEYS, http_value, "a table with port (and host)")
            out.update({HTTP_KEYS[sub][0]: v for sub, v in http.items()})
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
            elif key == "engine":
                s.engine = {**s.engine, **value}
            elif key == "limits":
                s.limits = {**s.limits, **value}
            else:
                setattr(s, key, value)
    try:
        s.request_limits().check_stats_size(s.max_live_requests)
    except ValueError as e:
        raise SettingsError(str(e)) from None
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


def _describe_devices(devices: list[Any]) -> str:
    kinds = sorted({d.platform for d in devices}) or ["no"]
    return f"{len(devices)} {'/'.join(kinds)} device{'s' if len(devices) != 1 else ''}"


def resolve_mode(settings: ServeSettings, devices: list[Any]) -> tuple[str, str | None]:
    """(the mode to run, why "auto" chose it or None). "auto": crosspool when there are >= 2
    devices (KV pool + weights pool), else shared on the one device. Checks `pools` against the
    mode and the device count (SettingsError)."""
    mode, why = settings.mode, None
    n = len(devices)
    if mode == "auto":
        if n >= 2:
            mode = "crosspool"
            why = f"mode auto: crosspool on {_describe_devices(devices)} (KV pool + weights pool)"
        else:
            mode = "shared"
            why = (f"mode auto: shared, because {_describe_devices(devices)} cannot be split into a KV pool "
                   "and a weights pool (crosspool needs >= 2; on a CPU-only machine "
                   "XLA_FLAGS=--xla_force_host_platform_device_count=2 gives 2 virtual devices, as "
                   "scripts/serve.sh does)")
    if mode not in POOLED_MODES:
        return mode, why
    p = settings.pools
    if mode == "crosspool":
        if p is not None and "+" not in p:
            raise SettingsError(
                f'mode crosspool: pools must be KV+WEIGHTS device counts (e.g. "1+1"), got {p!r}'
            )
        if p is None and n < 2:
            raise SettingsError(
                f"mode crosspool needs at least 2 devices (a KV pool and a weights pool), found "
                f"{_describe_devices(devices)}; use --mode shared (or auto), or on a CPU-only machine "
                "XLA_FLAGS=--xla_force_host_platform_device_count=2"
            )
        if p is not None:
            kv, w = (int(x) for x in p.split("+"))
            if kv + w > n:
                raise SettingsError(
                    f"mode crosspool: pools {p} needs {kv + w} devices, found {_describe_devices(devices)}"
                )
    elif p is not None:
        if "+" in p:
            raise SettingsError(
                f"mode {mode}: pools is the number of devices to use (e.g. \"{n}\"), got {p!r} "
                "(KV+WEIGHTS is for mode crosspool)"
            )
        if int(p) > n:
            raise SettingsError(f"mode {mode}: pools {p} is more than the {_describe_devices(devices)} found")
    return mode, why


def make_engine(
    settings: ServeSettings,
    log: Callable[[str], None] | None = None,
    *,
    engine_config: Any = None,
    devices: list[Any] | None = None,
    engine_class: Any = None,
) -> Any:
    """The engine `settings` ask for, with its models added: the demo models (unless turned off or
    `models` are given; a configured model wins over a demo of the same name), then each
    `models` checkpoint, all through `add_model(name, config, weights, tokenizer, source)`.

    mode "reference": serving.server.ServingEngine. Pooled modes ("auto" resolves to crosspool or
    shared, see `resolve_mode`): `PooledEngine(mode=, pools=, max_live_requests=, config=, devices=)`
    from crosspool_jax.engine (a SettingsError while it does not exist). `config` is `engine_config`
    (default: the engine's defaults) with the fields `settings.engine` sets on top; when neither sets
    `attention_backend` and the devices are CPUs, the plain-jnp "reference" attention is used (the
    Pallas kernels only run interpreted on CPU: slower to compile and to run). `devices` default to
    `jax.devices()`. The server also calls `tokenizer(name)` and `model_eos_ids(name)` (and, for
    GetStats / the metrics, what serving/stats.py reads) on the engine."""
    log = log or (lambda msg: None)
    if settings.mode == "reference":
        from serving.server import ServingEngine

        if settings.pools:
            log(f"serve: pools {settings.pools!r} are ignored in mode reference")
        if settings.engine:
            log(f"serve: engine settings ({', '.join(settings.engine)}) are ignored in mode reference")
        engine = ServingEngine(max_live_requests=settings.max_live_requests)
    else:
        engine = _pooled_engine(settings, log, engine_config, devices, engine_class)
    try:
        _add_models(engine, settings, log)
    except BaseException:
        engine.shutdown(timeout=0)
        raise
    return engine


def _pooled_engine(settings: ServeSettings, log: Callable[[str], None], engine_config: Any,
                   devices: list[Any] | None, engine_class: Any) -> Any:
    """`make_engine`'s pooled engine (no models yet): its class, devices, mode and config."""
    cls = engine_class or pooled_engine_class()  # engine_class: a multi-host group's engine
    if cls is None:
        shown = settings.mode if settings.mode != "auto" else "auto (the pooled engine)"
        raise SettingsError(f"mode {shown} needs the pooled engine (not available yet)")
    # a class with config / devices bound by functools.partial (how benchmarks/runner.py passed
    # them before make_engine took them): those are the defaults of the two keywords
    bound = getattr(cls, "keywords", None) or {}
    if engine_config is None:
        engine_config = bound.get("config")
    if devices is None:
        devices = bound.get("devices")
    if devices is None:
        import jax

        from crosspool_jax.memory.topology import devices_needed, ensure_cpu_devices

        # CPU only: the virtual devices --pools asks for (auto counts as crosspool)
        ensure_cpu_devices(devices_needed("crosspool" if settings.mode == "auto" else settings.mode,
                                          settings.pools) if settings.pools else 0)
        devices = jax.devices()
    devices = list(devices)
    mode, why = resolve_mode(settings, devices)
    if why:
        log(f"serve: {why}")
    config = settings.engine_config(engine_config)
    # the step programs take as many stop ids as the server lets a request send
    config = dataclasses.replace(config, max_stop_ids=settings.request_limits().max_stop_token_ids)
    if config.attention_backend is None and devices and devices[0].platform == "cpu":
        config = dataclasses.replace(config, attention_backend="reference")
        log("serve: attention_backend reference on CPU (set engine.attention_backend to override)")
    try:
        engine = cls(mode=mode, pools=settings.pools, max_live_requests=settings.max_live_requests,
                     config=config, devices=devices)
    except (CrossPoolError, ValueError) as e:
        msg = " ".join(str(e).split())
        raise SettingsError(f"mode {mode}: the engine refused its settings: {msg}") from None
    describe = getattr(engine, "describe", None)
    if callable(describe):
        log(f"serve: {describe()}")
    return engine


def _add_models(engine: Any, settings: ServeSettings, log: Callable[[str], None]) -> None:
    """`make_engine`'s models: the demo models (unless turned off; a configured model of the same
    name wins), then each configured checkpoint (the pooled engine loads it to host, then places
    it, or registers it on disk with `load_on_request`)."""
    verb = "loaded" if settings.mode == "reference" else "placed"
    if settings.load_demo:
        from crosspool_jax.demo import demo_models

        for name, m in demo_models().items():
            if name not in settings.models:
                t0 = time.perf_counter()
                engine.add_model(name, m.config, m.weights, m.tokenizer, source="builtin-demo")
                log(f"serve: {verb} {name} ({m.config.family.value}) in {time.perf_counter() - t0:.1f} s"
                    + _weights_note(engine, name))
    if not settings.models:
        return
    from checkpoints import load_model  # local import: checkpoints pulls in orbax

    for name, path in settings.models.items():
        log(f"serve: loading {name} from {path}")
        t0 = time.perf_counter()
        if settings.mode != "reference":  # the pooled engine loads to host, then places
            engine.load_model(name, path, on_disk=settings.load_on_request)
        else:
            m = load_model(path)
            engine.add_model(name, m.config, m.weights, m.tokenizer, source=str(path))
        if settings.load_on_request and settings.mode != "reference":
            log(f"serve: registered {name} on disk (loaded at its first request)")
        else:
            log(f"serve: {verb} {name} in {time.perf_counter() - t0:.1f} s" + _weights_note(engine, name))


def _weights_note(engine: Any, name: str) -> str:
    from serving.stats import model_weights

    w = model_weights(engine, name)
    return f" ({w.bytes / 2**20:.2f} MiB of weights)" if w is not None else ""
