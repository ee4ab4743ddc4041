"""The `crosspool` command line: `crosspool convert` (HF -> crosspool checkpoint), `crosspool generate`
(local, or `--server ADDR` through the gRPC client), `crosspool serve` (the gRPC server) and
`crosspool bench` (benchmarks/runner.py: one trace against crosspool, shared and static);
`crosspool simulate` (benchmarks/sim/replay.py: the same, predicted in simulated time).

Every error the engine raises on purpose (CrossPoolError, ConfigError included) is printed as one
line `crosspool: error: <message>` on stderr, exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from crosspool_jax.errors import CrossPoolError, InvalidRequestError

EXIT_ERROR = 2
DTYPES = ("bfloat16", "float16", "float32")


def _log(msg: str) -> None:
    print(f"crosspool: {msg}", file=sys.stderr, flush=True)


# ---- convert ---------------------------------------------------------------------------------------


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an HF safetensors model directory to a crosspool checkpoint")
    p.add_argument(
        "--hf", required=True, metavar="DIR", help="HF model directory (config.json + safetensors)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (crosspool checkpoint)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default: the checkpoint's)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    """Loads `--hf` with checkpoints.load_hf and writes it with checkpoints.orbax_format.save."""
    from checkpoints.hf_import import load_hf
    from checkpoints.orbax_format import save
    from checkpoints.tokenizer import TOKENIZER_FILE, load_tokenizer
    from crosspool_jax.models.params import tree_bytes

    t0 = time.perf_counter()
    _log(f"convert: reading {args.hf}")
    cfg, weights = load_hf(args.hf, dtype=args.dtype)
    n_bytes = tree_bytes(weights)
    _log(
        f"convert: loaded {cfg.family.value} ({cfg.num_layers} layers, {cfg.num_experts} experts, "
        f"{cfg.dtype}, {n_bytes / 2**20:.1f} MiB) in {time.perf_counter() - t0:.1f} s"
    )
    tok = load_tokenizer(args.hf)  # validates tokenizer.json before it is copied
    tok_path = os.path.join(args.hf, TOKENIZER_FILE) if tok is not None else None
    t1 = time.perf_counter()
    _log(f"convert: writing {args.out}" + (" (with tokenizer.json)" if tok_path else ""))
    save(args.out, cfg, weights, tokenizer_json_path=tok_path)
    _log(f"convert: done in {time.perf_counter() - t1:.1f} s")
    return 0


# ---- generate (wired by crosspool_jax/models/reference.py) ------------------------------------------------


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens (reference path, a pooled mode, or a server)")
    p.add_argument("--model", required=True, action="append", metavar="PATH",
                   help="HF directory or crosspool checkpoint (repeat: the prompt goes to every model "
                        "concurrently, one JSON line per model)")
    p.add_argument("--mode", choices=("reference", "crosspool", "shared", "static"), default="reference",
                   help="execution mode (default reference: the single-model oracle path)")
    p.add_argument("--pools", default=None, metavar="KV+W",
                   help="crosspool device split (e.g. 4+4); shared/static: devices to use")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt-ids", type=_prompt_ids, metavar="1,2,3", help="prompt token ids")
    prompt.add_argument("--prompt", metavar="TEXT", help="prompt text (needs the checkpoint's tokenizer)")
    p.add_argument("--max-new-tokens", type=int, default=32, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1.0 = off")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--stop-ids", type=_prompt_ids, default=None, metavar="1,2", help="stop token ids")
    p.add_argument(
        "--server", default=None, metavar="ADDR", help="use the `crosspool serve` at ADDR; --model is a NAME"
    )
    p.add_argument("--auth-token", default=None, metavar="TOKEN", help="bearer token for --server")
    p.add_argument(
        "--tls-ca",
        default=None,
        metavar="FILE",
        help="--server speaks TLS; trust this PEM CA (or self-signed cert)",
    )
    p.add_argument(
        "--tls", action="store_true", help="--server speaks TLS; trust the system's root certificates"
    )
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generates with the reference path (crosspool_jax.models.reference.generate_cli), or with --server
    through the gRPC client."""
    if getattr(args, "server", None):
        if len(args.model) != 1:
            raise InvalidRequestError("--server takes one --model NAME")
        args.model = args.model[0]
        return _generate_remote(args)
    if args.mode == "reference" and len(args.model) == 1:
        from crosspool_jax.models.reference import generate_cli  # local import: keeps `crosspool --help` fast

        args.model = args.model[0]
        return int(generate_cli(args))
    return _generate_pooled(args)


def _generate_pooled(args: argparse.Namespace) -> int:
    """Several models (or a pooled mode): the prompt goes to every model concurrently through one
    engine; one JSON line per model, in --model order."""
    import json

    from checkpoints import load_model
    from crosspool_jax.engine import PooledEngine
    from crosspool_jax.engine_api import ReferenceEngine, make_request
    from crosspool_jax.execution.sampling import SamplingParams
    from crosspool_jax.models.reference import validate_request

    engine = ReferenceEngine() if args.mode == "reference" else PooledEngine(mode=args.mode, pools=args.pools)
    try:
        handles = []
        host = None
        if args.mode != "reference":  # pooled modes place pieces from host memory
            import jax

            host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
        loaded = []  # every model is placed before any request runs (static mode sizes its
        for i, path in enumerate(args.model):  # reservations by the models placed)
            m = load_model(path, shardings=host)
            name = f"{i}:{path}"
            engine.add_model(name, m.config, m.weights, m.tokenizer, source=str(path))
            loaded.append((name, path, m))
        sp = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        requests = []  # all validated before the first is submitted
        for name, path, m in loaded:
            if args.prompt is not None:
                if m.tokenizer is None:
                    raise InvalidRequestError(f"{path}: --prompt needs a tokenizer.json; use --prompt-ids")
                ids = m.tokenizer.encode(args.prompt)
            else:
                ids = list(args.prompt_ids)
            stops = list(engine.model_eos_ids(name) if args.stop_ids is None else args.stop_ids)
            req = make_request(name, ids, args.max_new_tokens, sp, stops)
            validate_request(m.config, req.prompt_ids, req.max_new_tokens, req.stop_token_ids)
            requests.append((path, m, req))
        for path, m, req in requests:
            handles.append((path, m, engine.submit(req)))
        for path, m, h in handles:
            toks, reason, err = [], None, None
            for ev in h.events():
                if ev.token_id is not None:
                    toks.append(ev.token_id)
                reason, err = ev.finish_reason, ev.error
            if reason == "error":
                raise CrossPoolError(f"{path}: {err}")
            line = {"model": path, "token_ids": toks, "finish_reason": reason}
            if m.tokenizer is not None:
                line["text"] = m.tokenizer.decode(toks)
            print(json.dumps(line), flush=True)
    finally:
        engine.shutdown(timeout=0)
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    """`crosspool generate --server ADDR`: one JSON line, like the local path."""
    import json

    # gRPC's C core logs a failed TLS handshake at INFO on stderr; keep the error to our one line
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    import grpc

    from serving.client import CrossPoolClient, server_unavailable

    kw: dict = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_token_ids=args.stop_ids or (),
    )
    if args.prompt is not None:
        kw["prompt"] = args.prompt
    else:
        kw["prompt_ids"] = args.prompt_ids
    tls = bool(args.tls or args.tls_ca)
    client = CrossPoolClient(args.server, auth_token=args.auth_token, tls_ca=args.tls_ca, tls=tls)
    try:
        with client as c:
            out = c.generate(args.model, **kw)
    except grpc.RpcError as e:
        hint = ""
        # a connection failure gets the hint; not the server's own "starting" / "shutting down"
        if e.code() == grpc.StatusCode.UNAVAILABLE and not server_unavailable(e):
            hint = (
                " (is the server up, does it speak TLS, and does --tls-ca trust its certificate?)"
                if tls
                else " (is the server up? if it uses TLS, pass --tls-ca FILE)"
            )
        raise CrossPoolError(f"{args.server}: {e.code().name}: {e.details()}{hint}") from None
    line = {"token_ids": out["token_ids"], "finish_reason": out.get("finish_reason"), "text": out["text"]}
    print(json.dumps(line), flush=True)
    return 0


# ---- serve -----------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the crosspool.v1 gRPC server (default: the built-in demo models)",
        description="Flags override the --config file; unset flags keep the file's value or the default.",
    )
    _add_serve_server(p)
    _add_serve_modes(p)
    _add_serve_multihost(p)
    _add_serve_engine(p)
    _add_serve_limits(p)
    p.set_defaults(func=cmd_serve)


def _add_serve_server(p: argparse.ArgumentParser) -> None:
    """serve: the settings file, the listener, models, auth, TLS and the HTTP / metrics ports."""
    p.add_argument(
        "--config", default=None, metavar="FILE.toml", help="settings file (serving/example_config.toml)"
    )
    p.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="listen port (default 50051; 0: a free port)")
    p.add_argument(
        "--model", action="append", default=None, metavar="NAME=PATH", help="serve a checkpoint (repeatable)"
    )
    p.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the built-in demo models (default: yes unless models are given)",
    )
    p.add_argument("--max-live-requests", type=int, default=None, metavar="N", help="default 64")
    p.add_argument("--auth-token", default=None, metavar="TOKEN", help="require this bearer token")
    p.add_argument(
        "--grace", type=float, default=None, metavar="S", help="drain time on shutdown (default 10)"
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="N",
        help="serve Prometheus metrics on 127.0.0.1:N/metrics (0: a free port; default: off)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        metavar="N",
        help="also serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health) on HOST:N, same engine, token and TLS (0: a free port; default: off)",
    )
    p.add_argument("--tls-cert", default=None, metavar="FILE", help="PEM certificate chain: serve TLS only")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="PEM private key of --tls-cert")


def _add_serve_modes(p: argparse.ArgumentParser) -> None:
    """serve: the engine mode, its devices, and what compiles or loads before serving."""
    p.add_argument(
        "--mode",
        default=None,
        metavar="MODE",
        help="engine: auto (default: crosspool on >= 2 devices, else shared), crosspool, shared, static "
        "(the pooled engine) or reference (one request at a time)",
    )
    p.add_argument(
        "--pools",
        default=None,
        metavar="KV+W|N",
        help="crosspool: KV+WEIGHTS device split, e.g. 4+4 (default: half and half); shared/static: "
        "devices to use (default: all)",
    )
    p.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the step programs of a short request per model before serving (default: yes in "
        "pooled modes)",
    )
    p.add_argument(
        "--load-on-request",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pooled modes: register the configured models on disk (config and tokenizer read) and "
        "load each at its first request, instead of loading them all before serving (default: no)",
    )
    p.add_argument(
        "--precompile-context",
        type=int,
        default=None,
        metavar="TOKENS",
        help="pooled modes: before serving, compile every one-lane step program for requests of up "
        "to TOKENS tokens, several at once (PooledEngine.precompile; default 0: off). Meant for GPUs "
        "(coarse shape buckets: 56 programs per model class at 8K tokens, 84 at 128K, 64 requests); "
        "on CPU the fine buckets make it hundreds",
    )


def _add_serve_multihost(p: argparse.ArgumentParser) -> None:
    """serve: one process per host (docs/deploy.md)."""
    mh = p.add_argument_group(
        "multi-host (one process per host; process 0 leads and alone listens for clients; docs/deploy.md)")
    mh.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                    help="jax.distributed's coordinator: process 0's address (default: "
                    "$JAX_COORDINATOR_ADDRESS; auto: JAX's cluster detection on Cloud TPU, SLURM, Open MPI, "
                    "Kubernetes)")
    mh.add_argument("--num-processes", type=int, default=None, metavar="N", help="processes in the group")
    mh.add_argument("--process-id", type=int, default=None, metavar="I", help="this process (0: the leader)")
    mh.add_argument("--step-port", type=int, default=None, metavar="PORT",
                    help="the leader's step channel to its followers (default: the coordinator's port + 1)")
    mh.add_argument("--step-timeout", type=float, default=10.0, metavar="S",
                    help="a follower silent this long is lost: the leader fails live requests and "
                    "reports NOT_SERVING (default 10)")
    mh.add_argument("--warm-programs", type=int, default=None, metavar="N",
                    help="step programs each model lane compiles in the background at load, on every "
                    "process (default: 4 on CPU, 8 on GPU; 0: none)")


def _add_serve_engine(p: argparse.ArgumentParser) -> None:
    """serve: the pooled engine's settings (EngineConfig)."""
    g = p.add_argument_group(
        "engine (pooled modes; crosspool_jax.engine.EngineConfig, or the [engine] table of --config)"
    )
    g.add_argument("--arena-bytes", default=None, metavar="SIZE",
                   help="arena per device, e.g. 64MiB (default: 64MiB on CPU, 80%% of free memory on GPU)")
    g.add_argument("--page-bytes", default=None, metavar="SIZE", help="bytes of one KV page (default 16384)")
    g.add_argument("--weights-fraction", type=float, default=None, metavar="F",
                   help="share of a KV / colocated device's arena for weights (default 0.5)")
    g.add_argument("--steps-per-call", type=int, default=None, metavar="K",
                   help="decode tokens per host call (default 4)")
    g.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="least prompt tokens a step prefills while requests decode (default 64; "
                        "512 on GPU)")
    g.add_argument("--prefill-share", type=float, default=None, metavar="F",
                   help="while requests decode, a step's prefill takes at most this share of a "
                        "measured decode call, at least one chunk (default 0.8)")
    g.add_argument("--max-prefill-tokens", type=int, default=None, metavar="N",
                   help="most prompt tokens of all requests per step (default 512; 4096 on GPU)")
    g.add_argument("--mixed-steps", default=None, action=argparse.BooleanOptionalAction,
                   help="a step that prefills a lane's prompts gives its decoding requests one token "
                        "each as rows of the same prefill call (default off)")
    g.add_argument("--compile-process", default=None, action=argparse.BooleanOptionalAction,
                   help="trace, lower and compile step programs in worker processes (default: on for "
                        "GPU, off on CPU)")
    g.add_argument("--compile-workers", type=int, default=None, metavar="N",
                   help="background compiles at once per device group; with --compile-process, worker "
                        "processes (default: 4 per engine on GPU shared among its groups, else 1)")
    g.add_argument("--micro-batches", type=int, default=None, metavar="N",
                   help="decode lanes per model (2 = ping-pong; default 1)")
    add_admission_flags(g)
    g.add_argument("--dtype", default=None, metavar="DTYPE",
                   help="arena dtype: float32, bfloat16 or float16 (default: float32 on CPU, else bfloat16)")
    g.add_argument("--attention-backend", default=None, metavar="B",
                   help="gpu, tpu, interpret, tpu_interpret or reference (default: the platform's; "
                   "reference on CPU)")
    g.add_argument("--attention-kernels", default=None, choices=("auto", "triton", "mosaic"),
                   help="auto (default: on Hopper GPUs the Mosaic GPU attention kernels where "
                   "measured faster, else Triton), triton or mosaic (pallas_kernels.dispatch)")
    g.add_argument("--execution", default=None, choices=("lowered", "host", "auto"),
                   help="crosspool step strategy: lowered (one program over both pools; default), host "
                   "(host-scheduled per-layer calls on each pool's mesh) or auto (per step shape, "
                   "the faster of the two, measured)")
    g.add_argument("--overlap", default=None, action=argparse.BooleanOptionalAction,
                   help="host work (planning, inputs, streaming) overlaps device work: each step reads "
                   "the previous step's tokens (default on)")
    g.add_argument("--idle-sleep-s", type=float, default=None,
                   help="seconds without a request after which a model sleeps (weights to host memory; "
                   "its next request wakes it); default: never")
    g.add_argument("--host-weights-bytes", default=None, metavar="SIZE",
                   help="host memory for sleeping models' weights; past it the least recently used "
                   "sleeping model loaded from a checkpoint is dropped to disk (re-read on its next "
                   "request); default: 90%% of XLA's pinned host pool")


def _add_serve_limits(p: argparse.ArgumentParser) -> None:
    """serve: what one request may cost (RequestLimits)."""
    lim = p.add_argument_group(
        "limits (what one request may cost; serving.limits.RequestLimits, or the [limits] table of "
        "--config; a request past one is INVALID_ARGUMENT naming it)"
    )
    for name, metavar, default, what in LIMIT_FLAGS:
        lim.add_argument("--" + name.replace("_", "-"), default=None, metavar=metavar,
                         help=f"{what} (default {default})")


# (RequestLimits field, metavar, default shown, what it bounds)
LIMIT_FLAGS = (
    ("max_request_id_bytes", "SIZE", "128", "bytes of a request id"),
    ("max_model_name_bytes", "SIZE", "256", "bytes of a model name"),
    ("max_path_bytes", "SIZE", "4096", "bytes of LoadModel's path"),
    ("max_prompt_bytes", "SIZE", "1MiB", "bytes of a prompt text"),
    ("max_prompt_tokens", "N", "131072", "tokens of a prompt"),
    ("max_new_tokens", "N", "131072", "max_new_tokens of a request"),
    ("max_stop_token_ids", "N", "16", "stop token ids of a request (also the engine's step programs' "
     "stop width, rounded up to a power of two)"),
    ("max_stop_strings", "N", "16", "stop strings of a request"),
    ("max_stop_string_bytes", "SIZE", "256", "bytes of one stop string"),
)


def add_admission_flags(g: Any) -> None:
    """The KV planner's admission rules (`EngineConfig.admission_backfill` /
    `starving_after_steps`) as flags of an argument group: serve, bench and simulate."""
    g.add_argument("--admission-backfill", default=None, action=argparse.BooleanOptionalAction,
                   help="a later request of a model whose first waiting request does not fit the KV "
                        "pool may start (default on; docs/planner.md)")
    g.add_argument("--starving-after-steps", type=int, default=None, metavar="N",
                   help="a request that has not fit the KV pool for N steps has its pages held back "
                        "from other admissions until it starts (default 20; 0: never)")


ENGINE_FLAGS = ("arena_bytes", "page_bytes", "weights_fraction", "steps_per_call", "prefill_chunk",
                "prefill_share", "mixed_steps", "compile_process", "compile_workers",
                "max_prefill_tokens", "micro_batches",
                "dtype", "attention_backend", "attention_kernels",
                "execution", "overlap", "idle_sleep_s", "host_weights_bytes",
                "admission_backfill", "starving_after_steps")


def serve_settings(args: argparse.Namespace):  # -> serving.settings.ServeSettings
    """The serve settings from --config (if any) overridden by the flags that were given."""
    from serving.settings import (
        SettingsError,
        build_settings,
        check_engine_value,
        check_limit_value,
        check_value,
        load_config,
        parse_model_spec,
    )

    config = load_config(args.config) if args.config else {}
    flags = {
        "host": args.host,
        "port": args.port,
        "demo": args.demo,
        "max_live_requests": args.max_live_requests,
        "auth_token": args.auth_token,
        "metrics_port": args.metrics_port,
        "grace": args.grace,
        "mode": args.mode,
        "pools": args.pools,
        "warmup": args.warmup,
        "load_on_request": args.load_on_request,
        "precompile_context": args.precompile_context,
    }
    overrides = {k: check_value(k, v, "--" + k.replace("_", "-")) for k, v in flags.items() if v is not None}
    engine = {k: check_engine_value(k, getattr(args, k), "--" + k.replace("_", "-"))
              for k in ENGINE_FLAGS if getattr(args, k, None) is not None}
    if engine:
        overrides["engine"] = engine
    limits = {}
    for name, *_ in LIMIT_FLAGS:
        v = getattr(args, name, None)
        if v is not None:
            flag = "--" + name.replace("_", "-")
            if not name.endswith("_bytes"):  # a count: an integer (sizes take "1MiB" as well)
                try:
                    v = int(v)
                except ValueError:
                    raise SettingsError(f"{flag}: must be an integer, got {v!r}") from None
            limits[name] = check_limit_value(name, v, flag)
    if limits:
        overrides["limits"] = limits
    if args.http_port is not None:  # the [http] table's port
        from serving.settings import HTTP_KEYS

        try:
            overrides["http_port"] = HTTP_KEYS["port"][1](args.http_port)
        except ValueError as e:
            raise SettingsError(f"--http-port: {e}") from None
    if args.model:
        overrides["models"] = dict(parse_model_spec(spec) for spec in args.model)
    overrides["tls_cert"], overrides["tls_key"] = args.tls_cert, args.tls_key
    return build_settings(config, overrides)


def cmd_serve(args: argparse.Namespace) -> int:
    """Starts the server from the settings (serving.settings): binds the port first (health
    NOT_SERVING, calls answer UNAVAILABLE "the server is starting"), then builds the engine, loads and
    warms up the models and flips health to SERVING; blocks until SIGINT / SIGTERM, then drains live
    requests for --grace s (a second signal exits at once)."""
    from serving.settings import make_engine

    settings = serve_settings(args)
    cluster = _join_cluster(args, settings)  # before anything else uses JAX
    if cluster is not None and not cluster.is_leader:
        return _serve_follower(cluster, settings, args.warm_programs)
    if settings.tls:  # check the files before any model is loaded
        from serving.tls import server_credentials

        server_credentials(settings.tls_cert, settings.tls_key)
    from serving.server import ServeInterrupted, ShutdownSignals, serve_forever

    t0 = time.perf_counter()
    running = _listen_first(settings)
    http_note = f" (and HTTP on {running.http_address}: 503 until then)" if running.http else ""
    listening = [f"serve: listening on {running.address}{http_note}; health NOT_SERVING until the models "
                 "are loaded"]

    def start_log(msg: str) -> None:  # says the port is open with the first start-up line (if any)
        while listening:
            _log(listening.pop())
        _log(msg)

    signals = ShutdownSignals(log=_log).install()
    signals.interrupt = True  # the first signal while starting stops the start-up
    engine = channel = None
    try:
        engine_class = None
        if cluster is not None:  # the leader: its followers connect, then every process builds the engine
            channel, engine_class = _leader_engine_class(cluster, args, start_log)
        engine = make_engine(settings, log=start_log, engine_class=engine_class)
        if cluster is not None:
            engine.freeze_models()  # the followers placed these models; LoadModel would diverge
            engine.check_group()  # a follower started differently reports it and the group is lost
        mode = str(getattr(engine, "mode", settings.mode))
        _prepare_engine(engine, settings, mode, start_log)
        _set_ready(engine, settings, running, leader=cluster is not None)
        signals.interrupt = False  # from here a signal drains (serve_forever)
    except ServeInterrupted as e:
        _log(f"serve: shutting down (signal {e}) while starting")
        if engine is not None:
            engine.shutdown(timeout=0)  # make_engine shuts its own down when interrupted inside it
        running.stop(0)
        signals.restore()
        _log("serve: stopped")
        return 0
    except BaseException:
        signals.interrupt = False
        if engine is not None:
            engine.shutdown(timeout=0)
        elif channel is not None:
            channel.close()
        running.stop(0)
        signals.restore()
        raise
    _log(f"serve: ready in {time.perf_counter() - t0:.1f} s")
    names = ", ".join(m.name for m in engine.list_models()) or "none"
    tls = ", TLS" if running.tls else ""
    print(f"crosspool: serving on {running.address} (mode {mode}{tls}; models: {names})", flush=True)
    if running.http is not None:
        print(f"crosspool: OpenAI-compatible HTTP API on {running.http.url}/v1", flush=True)
    try:
        serve_forever(running, grace=settings.grace, log=_log, signals=signals)
    finally:
        signals.restore()
    if cluster is not None and engine.lost_reason is not None:
        _log("serve: exit status 1: the group lost a process (its collectives in flight never finish)")
        _hard_exit(1)
    return 0


def _listen_first(settings: Any) -> Any:
    """`cmd_serve`'s ports, before any model is loaded (a port in use is refused at once): checks
    the metrics port, then starts the gRPC server (and the HTTP API) with no engine yet (health
    NOT_SERVING). Returns the `RunningServer`."""
    from serving.server import listen_error, start_server

    if settings.metrics_port:  # a metrics port in use: say so now, not after the models are loaded
        why = listen_error("127.0.0.1", settings.metrics_port)
        if why:
            raise OSError(f"--metrics-port: cannot listen on 127.0.0.1:{settings.metrics_port}: {why}")
    return start_server(
        None,
        settings.host,
        settings.port,
        auth_token=settings.auth_token,
        max_workers=max(32, settings.max_live_requests + 16),
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
        limits=settings.request_limits(),
        http_port=settings.http_port,
        http_host=settings.http_host,
    )


def _leader_engine_class(cluster: Any, args: argparse.Namespace, start_log: Callable[[str], None]
                         ) -> tuple[Any, Any]:
    """The leader's step channel (its followers connected) and the engine class built over it."""
    from crosspool_jax.distributed.channel import LeaderChannel
    from crosspool_jax.distributed.engine import DistributedEngine

    _host, port = cluster.step_address()
    start_log(f"serve: waiting for {cluster.num_processes - 1} followers on the step channel "
              f"(port {port})")
    channel = LeaderChannel.open("", port, cluster.num_processes - 1, timeout=args.step_timeout)
    return channel, functools.partial(DistributedEngine, channel=channel,
                                      warm_programs=args.warm_programs)


def _prepare_engine(engine: Any, settings: Any, mode: str, start_log: Callable[[str], None]) -> None:
    """Warm-up (default: every mode but reference) and the ahead-of-time precompile the settings
    ask for; from then on a compile while serving is logged."""
    if settings.warmup if settings.warmup is not None else mode != "reference":
        from serving.warmup import warm_up

        warm_up(engine, log=start_log)
    if settings.precompile_context and hasattr(engine, "precompile"):
        ctx = settings.precompile_context
        n = engine.precompile(ctx, log=lambda m: start_log(f"precompile: {m}"))
        start_log(f"precompile: {n} step programs for requests up to {ctx} tokens")
    if hasattr(engine, "on_compile"):  # a compile while serving stalls the engine: say so
        engine.on_compile = lambda note: _log(f"engine: {note}")


def _set_ready(engine: Any, settings: Any, running: Any, leader: bool) -> None:
    """Starts the metrics endpoint (if asked) and flips health to SERVING; a group leader's
    health goes NOT_SERVING when the group loses a process."""
    metrics = None
    if settings.metrics_port is not None:
        from serving.metrics import ServerMetrics, start_metrics_http

        metrics = ServerMetrics(engine)
        _httpd, maddr = start_metrics_http(metrics, settings.metrics_port)
        print(f"crosspool: metrics on http://{maddr}/metrics", flush=True)
    running.set_ready(engine, metrics)
    if leader:
        def group_lost(msg: str) -> None:
            _log(f"serve: {msg}; health NOT_SERVING")
            running.set_not_serving()

        engine.on_group_lost = group_lost
        if engine.lost_reason is not None:  # lost before the hook was set
            group_lost(engine.lost_reason)


def _join_cluster(args: argparse.Namespace, settings: Any) -> Any:
    """With --coordinator / --num-processes (or JAX_COORDINATOR_ADDRESS): joins the multi-host
    group (jax.distributed.initialize; on CPU each process gets its share of the --pools devices)
    and returns its ClusterSpec; None for a single process."""
    from crosspool_jax.distributed.cluster import cluster_spec, initialize
    from crosspool_jax.memory.topology import devices_needed
    from serving.settings import SettingsError

    spec = cluster_spec(args.coordinator, args.num_processes, args.process_id, args.step_port)
    if spec is None:
        return None
    if settings.mode not in ("auto", "crosspool"):
        raise SettingsError(f"a multi-host group runs mode crosspool, not {settings.mode}")
    per_process = -(-devices_needed("crosspool", settings.pools) // (spec.num_processes or 1))
    spec = initialize(spec, cpu_devices=per_process)
    import jax

    devs = jax.devices()
    _log(f"serve: process {spec.process_id} of {spec.num_processes} (coordinator {spec.coordinator}): "
         f"{len(jax.local_devices())} of the group's {len(devs)} {devs[0].platform} devices")
    return spec


def _serve_follower(cluster: Any, settings: Any, warm_programs: int | None) -> int:
    """A follower: builds the same engine as the leader (no port of its own), then replays the
    leader's steps until the leader stops the group (crosspool_jax.distributed.engine)."""
    from crosspool_jax.distributed.channel import FollowerChannel
    from crosspool_jax.distributed.engine import DistributedEngine, run_follower
    from serving.settings import make_engine

    host, port = cluster.step_address()
    channel = FollowerChannel.connect(host, port, cluster.process_id)
    _log(f"serve: follower {cluster.process_id}: connected to the leader's step channel {host}:{port}")
    engine = make_engine(settings, log=_log,
                         engine_class=functools.partial(DistributedEngine, warm_programs=warm_programs))
    try:
        code = run_follower(channel, engine, _log)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # a failed replay (the leader was told): the error, then out
        _log(f"follower: {type(e).__name__}: {' '.join(str(e).split())}")
        code = 1
    if code != 0:  # the group is broken: a collective may never finish, so exit past the runtime
        channel.close()
        _hard_exit(code)
    engine.shutdown(timeout=0)
    import jax

    jax.distributed.shutdown()  # while the leader's coordination service still runs
    channel.close()  # tells the leader this process is done
    return code


def _hard_exit(code: int) -> None:
    """Exits at once (os._exit), output flushed: in a group that lost a process a collective in
    flight never finishes, and the device runtime's teardown at interpreter exit would wait on it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- bench (benchmarks/runner.py) ------------------------------------------------------------------


def _bench_runner():  # -> the benchmarks.runner module
    """benchmarks.runner; `benchmarks/` is not an installed package, so from a checkout the repo root
    (this file's parent's parent) is put on sys.path when the plain import fails."""
    try:
        import benchmarks.runner as runner
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isfile(os.path.join(root, "benchmarks", "runner.py")):
            raise
        sys.path.insert(0, root)
        import benchmarks.runner as runner
    return runner


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="replay a workload trace against crosspool, shared and static (P99 TBT, TTFT, goodput)",
        description="Replays one trace (a preset's, or --trace) through the gRPC server against each mode "
        "on the same devices; writes results.json and plot data to --out. See benchmarks/runner.py.",
    )
    try:
        runner = _bench_runner()
    except ImportError as e:  # an install without the repo's benchmarks/
        err = f"crosspool bench needs the repository's benchmarks/ package: {e}"
        p.set_defaults(func=lambda args: (_ for _ in ()).throw(CrossPoolError(err)))
        return
    runner.add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Runs benchmarks.runner with the parsed flags; its errors become one-line CLI errors."""
    runner = _bench_runner()
    from benchmarks.workload.trace import TraceFormatError

    args.command_line = " ".join(["crosspool", *sys.argv[1:]])
    try:
        return int(runner.main_args(args))
    except (ValueError, RuntimeError, TraceFormatError) as e:
        raise CrossPoolError(str(e)) from None


# ---- simulate (benchmarks/sim/replay.py) ------------------------------------------------------------


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="predict `crosspool bench` for crosspool, shared and static in simulated time (no devices)",
        description="Replays a trace through the engine's own planner, virtualizer and batching with device "
        "calls priced by a calibrated cost model; writes the bench's results.json keys. A prediction, not a "
        "measurement. See benchmarks/sim/replay.py and docs/simulator.md.",
    )
    try:
        _bench_runner()
        import benchmarks.sim.replay as sim
    except ImportError as e:  # an install without the repo's benchmarks/
        err = f"crosspool simulate needs the repository's benchmarks/ package: {e}"
        p.set_defaults(func=lambda args: (_ for _ in ()).throw(CrossPoolError(err)))
        return
    sim.add_arguments(p)
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Runs benchmarks.sim.replay with the parsed flags; its errors become one-line CLI errors."""
    _bench_runner()
    import benchmarks.sim.replay as sim
    from benchmarks.workload.trace import TraceFormatError

    args.command_line = " ".join(["crosspool", *sys.argv[1:]])
    try:
        return int(sim.main_args(args))
    except (ValueError, RuntimeError, TraceFormatError) as e:
        raise CrossPoolError(str(e)) from None


# ---- demo ------------------------------------------------------------------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the built-in demo models: export one as an HF model directory")
    dsub = p.add_subparsers(dest="demo_command", required=True, metavar="DEMO_COMMAND")
    e = dsub.add_parser(
        "export",
        help="write a demo model (config, safetensors, tokenizer) as an HF directory, no downloads",
        description="Writes a built-in demo model as an HF transformers directory (config.json, "
        "model.safetensors, tokenizer.json): a checkpoint for `crosspool generate --model DIR`, "
        "`crosspool convert --hf DIR`, `crosspool serve --model NAME=DIR` on a fresh machine.",
    )
    e.add_argument("out", metavar="DIR", help="output directory (new, empty, or an earlier export)")
    e.add_argument("--model", default="demo-mixtral", metavar="NAME",
                   help="demo-mixtral (default), demo-qwen3-moe or demo-deepseek-v3")
    e.add_argument("--dtype", choices=DTYPES, default=None, help="weights dtype (default float32)")
    e.set_defaults(func=cmd_demo_export)


def cmd_demo_export(args: argparse.Namespace) -> int:
    """`crosspool demo export DIR [--model NAME]`: crosspool_jax.demo.export_demo."""
    from crosspool_jax.demo import export_demo

    out = export_demo(args.out, args.model, dtype=args.dtype)
    _log(f"demo export: wrote {args.model} to {out}")
    return 0


# ---- main ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosspool", description="CrossPool-JAX: MoE serving engine tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_generate(sub)
    _add_serve(sub)
    _add_bench(sub)
    _add_simulate(sub)
    _add_demo(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `crosspool` console script. Returns the exit code (0 ok, 2 error)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except CrossPoolError as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"crosspool: error: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:  # unwritable output directory, disk full, ...
        print(f"crosspool: error: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
