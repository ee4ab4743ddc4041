#!/usr/bin/env bash
# Sets up .venv when needed, then starts the gRPC server on 127.0.0.1:50051 with the built-in demo
# models (no downloads), in the default mode: the pooled engine, `crosspool` (a KV pool and a
# weights pool) on the machine's devices. It compiles the step programs of a short request per model
# before it opens the port, logging each (`--no-warmup` skips that). Extra arguments go to
# `crosspool serve` (see `crosspool serve --help`; docs/serving.md).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
# A CPU-only machine has 1 JAX device, too few for a KV pool and a weights pool: give it 2 virtual
# CPU devices (the flag only changes the CPU backend, so it does nothing where GPUs/TPUs serve).
case "${XLA_FLAGS:-}" in
  *xla_force_host_platform_device_count*) ;;
  *) export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2" ;;
esac
exec .venv/bin/crosspool serve "$@"
