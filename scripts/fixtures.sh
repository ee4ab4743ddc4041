#!/usr/bin/env bash
# Builds the HF transformers reference fixtures when they are missing or stale.
#   bash scripts/fixtures.sh [OUTDIR]      (default: .cache/hf_fixtures under the repo root)
# Creates/refreshes .venv-ref (scripts/bootstrap.sh --ref), then runs tests/fixtures/hf_fixtures.py
# only if OUTDIR/manifest.json is missing or records a different generator_sha256 than the current
# generator's sha256. Prints one line saying which; exits non-zero on any failure.
set -euo pipefail

out="${1:-}"
if [ -n "$out" ]; then
  out="$(realpath -m -- "$out")"  # relative to the caller's directory, before the cd below
fi
cd "$(dirname "$0")/.."
out="${out:-$PWD/.cache/hf_fixtures}"

bash scripts/bootstrap.sh --ref

gen=tests/fixtures/hf_fixtures.py
want="$(sha256sum "$gen" | cut -d' ' -f1)"
have=""
if [ -f "$out/manifest.json" ]; then
  have="$(.venv-ref/bin/python -c '
import json, sys
try:
    print(json.load(open(sys.argv[1])).get("generator_sha256", ""))
except Exception:
    print("")
' "$out/manifest.json")"
fi

if [ "$have" = "$want" ]; then
  echo "[fixtures] up to date: $out (generator ${want:0:12})"
  exit 0
fi

reason="manifest.json missing"
[ -f "$out/manifest.json" ] && reason="generator changed (${have:0:12} -> ${want:0:12})"
start=$SECONDS
.venv-ref/bin/python "$gen" --out "$out" --quiet
echo "[fixtures] regenerated $out: $reason, took $((SECONDS - start))s"
