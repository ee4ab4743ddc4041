#!/usr/bin/env bash
# One device call of the GPU headline (issue 7): runs MODES of PRESET with `crosspool bench
# --resume` into bench-PRESET/ (modes an earlier call finished there are kept), then packs the
# results (without the compilation cache) into $OUT/bench-PRESET.tgz, one file for the device
# tool to bring back. Between calls, unpack that file into the checkout and carry bench-PRESET
# (and .gpu-vendor): the last call, with all three modes, writes the one report and its plots.
#
#   bash scripts/gpu_vendor.sh                                    # once, on the dev machine
#   bash benchmarks/gpu_headline.sh gpu-2 crosspool [runner flags]        # call 1
#   bash benchmarks/gpu_headline.sh gpu-2 crosspool,shared [flags]        # call 2 (keeps crosspool)
#   bash benchmarks/gpu_headline.sh gpu-2 crosspool,shared,static [flags] # call 3: the report
#
# Defaults (override by flags after MODES): fixed SLOs (TTFT 10 s, TPOT 0.2 s), the first 60 s of
# the trace, the persistent compilation cache in /tmp/jcc (kept while the machine stays warm, so
# a later call of the same lease reuses the programs; static's programs equal shared's).
# PYTHON: the interpreter (default: python, the GPU image's).
set -euo pipefail
preset=${1:?usage: gpu_headline.sh PRESET MODES [runner flags]}
modes=${2:?usage: gpu_headline.sh PRESET MODES [runner flags]}
shift 2
cd "$(dirname "$0")/.."
out_dir="bench-${preset}"
export PYTHONPATH=".:.gpu-vendor${PYTHONPATH:+:$PYTHONPATH}"
status=0
"${PYTHON:-python}" -m benchmarks.runner --preset "$preset" --modes "$modes" --resume --out "$out_dir" \
    --slo-ttft-s 10 --slo-tpot-s 0.2 --max-duration-s 60 --compile-cache /tmp/jcc "$@" || status=$?
if [ -n "${OUT:-}" ] && [ -d "$out_dir" ]; then
    tar czf "$OUT/${out_dir}.tgz" --exclude=jax-compile-cache "$out_dir"
    echo "packed $OUT/${out_dir}.tgz"
fi
exit "$status"
