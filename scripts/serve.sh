#!/usr/bin/env bash
# Sets up .venv when needed, then starts the gRPC server on 127.0.0.1:50051 with the built-in demo
# models (no downloads). Extra arguments go to `crosspool serve` (see `crosspool serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
exec .venv/bin/crosspool serve "$@"
