#!/usr/bin/env bash
# MLA decode: in-order (no lookahead) variants against the default, one process; on an H200 the 4K prefill after.
set -u
root=$PWD; start=$(date +%s); D=${DEADLINE:-420}
left() { echo $(( D - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1 PYTHONPATH=$root:$root/.gpu-vendor
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; date -u; } > $OUT/card.txt 2>&1
timeout 240 python -m benchmarks.mla_decode_probe --json $OUT/mla.json \
  --only "default,in order,in order bt64 st2,in order bt64 st2 s4,in order bt64 st2 wg0 2,approx,in order bt64 st2 approx" > $OUT/mla.log 2>&1
echo "mla rc=$? $(date -u +%T)" >> $OUT/card.txt
timeout 60 python -m benchmarks.mla_decode_probe --profile /tmp/prof_io --profile-tune '{"lookahead": false}' > $OUT/profile_inorder.log 2>&1
echo "profile rc=$? $(date -u +%T)" >> $OUT/card.txt
if grep -q H200 $OUT/card.txt && [ $(left) -gt 100 ]; then
  (export CROSSPOOL_COMPILATION_CACHE=/tmp/ccf
   timeout $(( $(left) - 5 )) python -m benchmarks.prefill --shapes olmoe-1b-7b,qwen3-30b-a3b --prompts 4096 --batch 1 --variants auto --iters 5 > $OUT/prefill4k.log 2>&1
   echo "prefill rc=$? $(date -u +%T)" >> $OUT/card.txt)
fi
cat $OUT/card.txt; grep -v "^|" $OUT/mla.log | tail -12; grep "^|" $OUT/mla.log
tail -14 $OUT/profile_inorder.log; tail -6 $OUT/prefill4k.log 2>/dev/null
