"""The `crosspool` command line: `crosspool convert` (HF -> crosspool checkpoint) and `crosspool generate`.

Every error the engine raises on purpose (CrossPoolError, ConfigError included) is printed as one
line `crosspool: error: <message>` on stderr, exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from crosspool_jax.errors import CrossPoolError

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
    from crosspool_jax.params import tree_bytes

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


# ---- generate (wired by crosspool_jax/reference.py) ------------------------------------------------


def _prompt_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate tokens with the single-model reference path")
    p.add_argument("--model", required=True, metavar="PATH", help="HF directory or crosspool checkpoint")
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
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Generates with the reference path (crosspool_jax.reference.generate_cli), or with --server
    through the gRPC client."""
    if getattr(args, "server", None):
        return _generate_remote(args)
    from crosspool_jax.reference import generate_cli  # local import: keeps `crosspool --help` fast

    return int(generate_cli(args))


def _generate_remote(args: argparse.Namespace) -> int:
    """`crosspool generate --server ADDR`: one JSON line, like the local path."""
    import json

    import grpc

    from serving.client import CrossPoolClient

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
    try:
        with CrossPoolClient(args.server, auth_token=args.auth_token) as c:
            out = c.generate(args.model, **kw)
    except grpc.RpcError as e:
        raise CrossPoolError(f"{args.server}: {e.code().name}: {e.details()}") from None
    line = {"token_ids": out["token_ids"], "finish_reason": out.get("finish_reason"), "text": out["text"]}
    print(json.dumps(line), flush=True)
    return 0


# ---- serve -----------------------------------------------------------------------------------------


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the crosspool.v1 gRPC server (default: the built-in demo models)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=50051, help="listen port (0: a free port)")
    p.add_argument(
        "--model", action="append", default=[], metavar="NAME=PATH", help="serve a checkpoint (repeatable)"
    )
    p.add_argument("--no-demo", action="store_true", help="do not load the built-in demo models")
    p.add_argument("--max-live-requests", type=int, default=64, metavar="N")
    p.add_argument("--auth-token", default=None, metavar="TOKEN", help="require this bearer token")
    p.add_argument("--grace", type=float, default=10.0, metavar="S", help="drain time on shutdown")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="N",
        help="serve Prometheus metrics on 127.0.0.1:N/metrics (0: a free port; default: off)",
    )
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """Starts the server with the demo models (unless --no-demo or --model is given) and blocks."""
    from serving.server import ServingEngine, demo_engine, serve_forever, start_server

    specs = []
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CrossPoolError(f"--model expects NAME=PATH, got {spec!r}")
        specs.append((name, path))
    if args.no_demo or specs:
        engine = ServingEngine(max_live_requests=args.max_live_requests)
    else:
        engine = demo_engine(max_live_requests=args.max_live_requests)
    for name, path in specs:
        _log(f"serve: loading {name} from {path}")
        engine.load_model(name, path)
    metrics = None
    if args.metrics_port is not None:
        from serving.metrics import ServerMetrics, start_metrics_http

        metrics = ServerMetrics(engine)
    running = start_server(engine, args.host, args.port, auth_token=args.auth_token, metrics=metrics)
    if metrics is not None:
        _httpd, maddr = start_metrics_http(metrics, args.metrics_port)
        print(f"crosspool: metrics on http://{maddr}/metrics", flush=True)
    names = ", ".join(m.name for m in engine.list_models()) or "none"
    print(f"crosspool: serving on {running.address} (models: {names})", flush=True)
    serve_forever(running, grace=args.grace)
    return 0


# ---- main ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosspool", description="CrossPool-JAX: MoE serving engine tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_generate(sub)
    _add_serve(sub)
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
