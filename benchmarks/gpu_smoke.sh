#!/usr/bin/env bash
# One device call of the one-GPU smoke replay (issues 15 and 16: TTFT P99, TBT P99 against the
# decode call), several variants back to back on the same card: each NAME runs `crosspool bench`
# (mode shared, the 40-s four-OLMoE smoke trace, fixed SLOs) with its FLAGS, then
# `benchmarks.call_gaps` and `benchmarks.decode_costs` on its call log and `benchmarks.ttft_tail`
# on its requests. For the device tool to bring back (8 files at most): $OUT/NAME.log (the
# bench's output, the gaps summary, the decode calls' fit, the slowest first tokens, the headline
# numbers) and $OUT/NAME.tgz (the run's directory without the
# compilation cache: results.json, requests, calls, plots).
#
#   bash scripts/gpu_vendor.sh                                          # once, on the dev machine
#   bash benchmarks/gpu_smoke.sh cold "--warmup 0 --precompile off" \
#        auto "--warmup 0 --precompile off --attention-kernels auto" \
#        warm "--precompile on"
#
# Each variant gets LIMIT seconds (default 170; `timeout`), its own fresh compilation cache
# unless its FLAGS name one. PYTHON: the interpreter (default: python, the GPU image's).
# A word `tree=DIR` among a variant's FLAGS runs that variant's bench from DIR (relative to this
# checkout, or absolute): the code of another commit unpacked there with `git archive REV | tar -x
# -C DIR`, for a baseline on the same machine; the trace and the analysis are this checkout's.
set -uo pipefail
if [ $# -lt 2 ] || [ $(($# % 2)) -ne 0 ]; then
    echo "usage: gpu_smoke.sh NAME FLAGS [NAME FLAGS ...]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
root=$PWD
export PYTHONPATH=".:.gpu-vendor${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out=${OUT:-/tmp/gpu_smoke}
mkdir -p "$out"
py=${PYTHON:-python}
status=0
while [ $# -gt 0 ]; do
    name=$1 flags=$2
    shift 2
    run=/tmp/gpu_smoke_$name
    rm -rf "$run"
    tree=$root words=()
    for w in $flags; do
        case $w in
            tree=/*) tree=${w#tree=} ;;
            tree=*) tree=$root/${w#tree=} ;;
            *) words+=("$w") ;;
        esac
    done
    echo "=== $name ($flags) $(date -u +%T)"
    (cd "$tree" && PYTHONPATH="$tree:$root/.gpu-vendor" timeout "${LIMIT:-170}" "$py" -m benchmarks.runner \
        --preset gpu-2 --devices 1 --modes shared --trace "$root/benchmarks/traces/gpu1_smoke_4olmoe_40s.jsonl" \
        --slo-ttft-s 10 --slo-tpot-s 0.2 "${words[@]}" --out "$run") > "$out/$name.log" 2>&1
    rc=$?
    echo "rc=$rc $(date -u +%T)" | tee -a "$out/$name.log"
    [ "$rc" -ne 0 ] && status=$rc
    if [ -f "$run/results.json" ]; then
        "$py" -m benchmarks.call_gaps "$run"/calls_shared.jsonl* --json "$run/gaps.json" 2>&1 | tee -a "$out/$name.log"
        "$py" -m benchmarks.decode_costs "$run"/calls_shared.jsonl* --json "$run/decode_costs.json" 2>&1 | tee -a "$out/$name.log"
        "$py" -m benchmarks.ttft_tail "$run/requests_shared.jsonl" --json "$run/ttft_tail.json" 2>&1 | tee -a "$out/$name.log"
        "$py" - "$run/results.json" <<'PY' 2>&1 | tee -a "$out/$name.log"
import json, sys
m = json.load(open(sys.argv[1]))["modes"]["shared"]
keys = ("finished", "ttft_s", "tbt_s", "decode_call_s", "replay_s", "ready_s", "compiles")
print({k: m.get(k) for k in keys})
PY
        tar czf "$out/$name.tgz" --exclude=jax-compile-cache -C "$run" .
    fi
done
exit "$status"
