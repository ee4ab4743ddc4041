#!/usr/bin/env bash
# The sampling's inverse-CDF draw ("new", this tree) vs HEAD 8bc4594 ("base", bisect/base):
# compile of the grid's first 3 decode programs (one thread, cold cache), decode calls' kernels,
# overlap. On an H200 first: 4K prefill MFU and the smoke replay at the defaults (this tree).
set -u
root=$PWD; start=$(date +%s); D=${DEADLINE:-575}
left() { echo $(( D - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; date -u; } > $OUT/card.txt 2>&1
h200=0; grep -q H200 $OUT/card.txt && h200=1
for t in base new; do
  d=$root; [ $t = base ] && d=$root/bisect/base
  (cd $d && echo "=== $t $(date -u +%T)" && PYTHONPATH=$d:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/ccc_$t \
   timeout 75 python -m benchmarks.precompile_bench --models 2 --max-context 131072 --max-slots 64 --threads 1 --programs 3; echo "rc=$?") >> $OUT/compile.log 2>&1
done
if [ $h200 = 1 ]; then
  (export PYTHONPATH=$root:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/ccp
   timeout 130 python -m benchmarks.prefill --shapes olmoe-1b-7b,qwen3-30b-a3b --prompts 4096 --batch 1 --variants auto --iters 5 --json $OUT/prefill4k.json > $OUT/prefill4k.log 2>&1
   echo "prefill rc=$? $(date -u +%T)" >> $OUT/card.txt)
  L=$(( $(left) - 20 )); [ $L -gt 330 ] && L=330
  LIMIT=$L bash benchmarks/gpu_smoke.sh default "--precompile on" > /dev/null 2>&1
  echo "smoke rc=$? $(date -u +%T) limit=$L" >> $OUT/card.txt
else
  for t in new base; do
    [ $(left) -lt 110 ] && break
    d=$root; [ $t = base ] && d=$root/bisect/base
    (cd $d && export PYTHONPATH=$d:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/ccp_$t
     timeout 100 python -m benchmarks.profile_step --decode 32,1 --decode-context 2048,43000 --decode-slots 32 --prefill "" --calls 5 --top 8
     echo "rc=$? $(date -u +%T)") > $OUT/ps_$t.log 2>&1
  done
  for t in new base; do
    [ $(left) -lt 80 ] && break
    d=$root; [ $t = base ] && d=$root/bisect/base
    (cd $d && export PYTHONPATH=$d:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/cco_$t
     timeout 75 python -m benchmarks.overlap --requests 32 --prompt 512 --new 128 --rounds 1; echo "rc=$?") > $OUT/ov_$t.log 2>&1
  done
fi
cat $OUT/card.txt; grep -E "^=== |precompiled|rc=|phases" $OUT/compile.log
tail -4 $OUT/prefill4k.log 2>/dev/null; tail -25 $OUT/default.log 2>/dev/null
for t in new base; do echo "== $t"; grep -E "^  olmoe|wall|sort|top-k" $OUT/ps_$t.log 2>/dev/null | head -10; done
for t in new base; do grep -E "overlap on / off|tokens/s" $OUT/ov_$t.log 2>/dev/null | tail -2; done
