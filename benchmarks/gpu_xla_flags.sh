#!/usr/bin/env bash
# One command under several XLA_FLAGS variants, each in its own process, back to back on one card
# (e.g. XLA's command buffers (CUDA graphs) around the step programs' layer and step loops):
#
#   bash benchmarks/gpu_xla_flags.sh default "" \
#        cbwhile "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
#        -- python -m benchmarks.profile_step --prefill "" --decode 1,8 --decode-context 43000,7400
#
# Each variant NAME runs the command after `--` with XLA_FLAGS set to its FLAGS (appended to any
# XLA_FLAGS already set), a LIMIT-second `timeout` (default 150) and `--json $OUT/NAME.json`
# appended when JSON=1 (default 0). For the device tool to bring back: $OUT/NAME.log per variant;
# each log's last TAIL lines (default 8) are printed after it ends. The exit status is the last
# failing variant's, 0 if none failed.
set -uo pipefail
names=() flags=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    [ $# -lt 2 ] && { echo "usage: gpu_xla_flags.sh NAME FLAGS [NAME FLAGS ...] -- COMMAND" >&2; exit 2; }
    names+=("$1") flags+=("$2")
    shift 2
done
[ $# -lt 2 ] && { echo "usage: gpu_xla_flags.sh NAME FLAGS [NAME FLAGS ...] -- COMMAND" >&2; exit 2; }
shift
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu_xla_flags}
mkdir -p "$out"
status=0
for i in "${!names[@]}"; do
    name=${names[$i]}
    extra=()
    [ "${JSON:-0}" = 1 ] && extra=(--json "$out/$name.json")
    echo "=== $name (XLA_FLAGS +${flags[$i]:-nothing}) $(date -u +%T)"
    # XLA reads a blank XLA_FLAGS as a file name and aborts: set it only when there are flags
    xf=$(echo "${XLA_FLAGS:-} ${flags[$i]}" | xargs)
    env ${xf:+XLA_FLAGS="$xf"} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
        timeout "${LIMIT:-150}" "$@" "${extra[@]}" > "$out/$name.log" 2>&1
    rc=$?
    echo "rc=$rc $(date -u +%T)" | tee -a "$out/$name.log"
    [ "$rc" -ne 0 ] && status=$rc
    tail -n "${TAIL:-8}" "$out/$name.log"
done
exit "$status"
