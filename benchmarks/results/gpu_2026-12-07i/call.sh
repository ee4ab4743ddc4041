#!/usr/bin/env bash
# Issue 15's compile ratio on one machine: the grid's first 3 decode programs, one thread, cold
# cache: this tree (3b071de + the profile's busiest-thread table), 2026-11-29's code (2828d33),
# this tree again; then this tree's compile profiled; on an H200 the 4K prefill after.
set -u
root=$PWD; start=$(date +%s); D=${DEADLINE:-400}
left() { echo $(( D - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; date -u; } > $OUT/card.txt 2>&1
OUT=$OUT/a LIMIT=40 bash benchmarks/gpu_compile.sh new1 "--models 2 --threads 1 --programs 3" > /dev/null 2>&1
OUT=$OUT/b LIMIT=58 bash benchmarks/gpu_compile.sh old1 "tree=bisect/2828d33 --models 2 --threads 1" > /dev/null 2>&1
OUT=$OUT/c LIMIT=40 bash benchmarks/gpu_compile.sh new2 "--models 2 --threads 1 --programs 3" > /dev/null 2>&1
for x in a b c; do cat $OUT/$x/*.log >> $OUT/compile.log; cat $OUT/$x/summary.txt >> $OUT/summary.txt; rm -rf $OUT/$x; done
(export PYTHONPATH=$root:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/ccprof
 timeout 80 python -m benchmarks.precompile_bench --models 2 --max-context 131072 --max-slots 64 --threads 1 --programs 3 --profile --profile-top 25 > $OUT/profile.log 2>&1
 echo "profile rc=$? $(date -u +%T)" >> $OUT/card.txt)
if grep -q H200 $OUT/card.txt && [ $(left) -gt 120 ]; then
  (export PYTHONPATH=$root:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/ccf
   timeout $(( $(left) - 5 )) python -m benchmarks.prefill --shapes olmoe-1b-7b,qwen3-30b-a3b --prompts 4096 --batch 1 --variants auto --iters 5 > $OUT/prefill4k.log 2>&1
   echo "prefill rc=$? $(date -u +%T)" >> $OUT/card.txt)
fi
cat $OUT/card.txt; grep -E "precompiled [123]/" $OUT/compile.log | cut -c1-120; cat $OUT/summary.txt
sed -n '/busiest/,$p' $OUT/profile.log | head -28; grep -E "precompiled 3 programs" $OUT/profile.log
tail -4 $OUT/prefill4k.log 2>/dev/null
