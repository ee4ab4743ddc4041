#!/usr/bin/env bash
# One device call of step-program grid compiles (issue 15: compile time per step program), several
# variants back to back on the same card: each NAME runs `benchmarks.precompile_bench` on the grid
# measured so far (3 OLMoE-1B-7B-shaped models, mode shared, contexts up to 131,072 tokens, 64
# slots, 8 threads) with its own fresh, empty compilation cache, and its ARGS:
#   tree=DIR        run the code in DIR (relative to this checkout, or absolute) instead of this
#                   checkout, e.g. an older commit unpacked into it with `git archive REV | tar -x
#                   -C DIR` before the call (untracked files travel with the working tree);
#   env=KEY=VALUE   an environment variable for this variant only (repeatable);
#   anything else   flags of precompile_bench, after the defaults (so they override them).
# For the device tool to bring back: $OUT/NAME.log per variant and $OUT/summary.txt, a table of
# each variant's programs, wall seconds and summed per-program seconds (printed last as well).
#
#   bash benchmarks/gpu_compile.sh head "" old "tree=bisect/c1eada0" \
#        kcache "env=JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=all" procs8 "--compile-process"
#
# Each variant gets LIMIT seconds (default 200; `timeout`) and the cache directory
# $CACHE_ROOT/gpu_compile_cache_NAME (default /tmp; emptied first). PYTHON: the interpreter (default
# python, the GPU image's). The exit status is the last failing variant's, 0 if none failed.
set -uo pipefail
if [ $# -lt 2 ] || [ $(($# % 2)) -ne 0 ]; then
    echo "usage: gpu_compile.sh NAME ARGS [NAME ARGS ...]" >&2
    exit 2
fi
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-/tmp/gpu_compile}
mkdir -p "$out"
py=${PYTHON:-python}
status=0
rows=()
while [ $# -gt 0 ]; do
    name=$1 args=$2
    shift 2
    tree=$root envs=() flags=()
    for w in $args; do
        case $w in
            tree=/*) tree=${w#tree=} ;;
            tree=*) tree=$root/${w#tree=} ;;
            env=*) envs+=("${w#env=}") ;;
            *) flags+=("$w") ;;
        esac
    done
    cache=${CACHE_ROOT:-/tmp}/gpu_compile_cache_$name
    rm -rf "$cache"
    echo "=== $name (tree ${tree#"$root"/}; env ${envs[*]:-none}; flags ${flags[*]:-none}) $(date -u +%T)"
    (cd "$tree" && env PYTHONPATH="$tree" PYTHONUNBUFFERED=1 CROSSPOOL_COMPILATION_CACHE="$cache" \
        "${envs[@]}" timeout "${LIMIT:-200}" "$py" -m benchmarks.precompile_bench --models 3 \
        --max-context 131072 --max-slots 64 --threads 8 "${flags[@]}") > "$out/$name.log" 2>&1
    rc=$?
    echo "rc=$rc $(date -u +%T)" | tee -a "$out/$name.log"
    [ "$rc" -ne 0 ] && status=$rc
    # "precompiled N programs in W s ..." and each program's "precompiled i/N: ... (S s)"
    rows+=("$(awk -v n="$name" -v rc="$rc" '
        /^precompiled [0-9]+ programs in / { progs = $2; wall = $5 }
        /^precompiled [0-9]+\/[0-9]+: / && match($0, /\([0-9.]+ s\)/) {
            sum += substr($0, RSTART + 1, RLENGTH - 4); done++ }
        END { printf "%-12s rc %-4s programs %-5s wall %-8s s  per-program sum %.1f s over %d\n",
              n, rc, progs ? progs : "-", wall ? wall : "-", sum, done }' "$out/$name.log")")
done
printf '%s\n' "${rows[@]}" | tee "$out/summary.txt"
exit "$status"
