#!/usr/bin/env bash
# The step programs' optimized HLO (3 decode + 2 prefill programs of the gpu-2 grid) counted by part;
# on an H200 also the 4K prefill of both shapes.
set -u
export PYTHONPATH=$PWD:$PWD/.gpu-vendor PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; date -u; git log --oneline -1; } > $OUT/card.txt 2>&1
(export CROSSPOOL_COMPILATION_CACHE=/tmp/cc_dump XLA_FLAGS="--xla_dump_to=/tmp/dump"
 timeout 120 python -m benchmarks.precompile_bench --models 2 --max-context 131072 --max-slots 64 --threads 1 --programs 5 > $OUT/dump.log 2>&1; echo rc=$? >> $OUT/dump.log)
python -m benchmarks.hlo_kernels /tmp/dump --top 45 > $OUT/hlo_kernels.txt 2>&1
(cd /tmp/dump && ls | grep -E "jit_body.*after_optimizations.txt$" | xargs tar czf $OUT/hlo_body.tgz)
if grep -q H200 $OUT/card.txt; then
  timeout 200 python -m benchmarks.prefill --shapes olmoe-1b-7b,qwen3-30b-a3b --prompts 4096 --batch 1 --variants auto --iters 5 > $OUT/prefill.log 2>&1
  echo "rc=$?" >> $OUT/prefill.log
fi
tail -3 $OUT/dump.log; cat $OUT/hlo_kernels.txt | head -70; tail -12 $OUT/prefill.log 2>/dev/null
