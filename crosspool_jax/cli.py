"""The `crosspool` command line: `crosspool convert` (HF -> crosspool checkpoint) and `crosspool generate`.

Every error the engine raises on purpose (CrossPoolError, ConfigError included) is printed as one
line `crosspool: error: <message>` on stderr, exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
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
    p.set_defaults(func=cmd_generate)


def cmd_generate(args: argparse.Namespace) -> int:
    """Hands the parsed arguments to `crosspool_jax.reference.generate_cli(args) -> int`."""
    try:
        reference = importlib.import_module("crosspool_jax.reference")
    except ModuleNotFoundError as e:
        if e.name != "crosspool_jax.reference":
            raise
        reference = None
    generate_cli = getattr(reference, "generate_cli", None)
    if generate_cli is None:
        raise CrossPoolError("generate is not available: crosspool_jax.reference.generate_cli is missing")
    return int(generate_cli(args))


# ---- main ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crosspool", description="CrossPool-JAX: MoE serving engine tools")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_convert(sub)
    _add_generate(sub)
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
