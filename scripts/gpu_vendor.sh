#!/usr/bin/env bash
# Fills .gpu-vendor/ with the pure-Python gRPC packages the GPU machines' image lacks (health
# checking and reflection; grpcio 1.84.0 itself is there), at the version matching that grpcio
# (their generated code refuses a grpcio older than itself). A device run carries .gpu-vendor and
# puts it on the path:  PYTHONPATH=.:.gpu-vendor python -m benchmarks.runner ...
#   GRPC_VERSION=1.84.0 bash scripts/gpu_vendor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ver="${GRPC_VERSION:-1.84.0}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip download -q --no-deps -d "$tmp" \
  "grpcio-health-checking==$ver" "grpcio-reflection==$ver"
rm -rf .gpu-vendor && mkdir -p .gpu-vendor
for whl in "$tmp"/*.whl; do
  .venv/bin/python -m zipfile -e "$whl" .gpu-vendor/
done
rm -rf .gpu-vendor/*.dist-info
echo "[gpu-vendor] $(ls .gpu-vendor | tr '\n' ' ')(grpc $ver)"
