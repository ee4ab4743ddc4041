#!/usr/bin/env bash
# (scratch/hlo_count.py, run below: the first version of benchmarks/hlo_kernels.py, untracked at the time)
# Branch sort-free (bisect/sortfree) vs main (bisect/main) on one card: overlap and profile_step in
# each; then the branch's optimized HLO of 4 programs counted by origin; then XLA options vs compile.
set -u
root=$PWD; start=$(date +%s); D=${DEADLINE:-470}
left() { echo $(( D - ($(date +%s) - start) )); }
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; date -u; } > $OUT/card.txt 2>&1
for t in sortfree main; do
  (cd $root/bisect/$t && export PYTHONPATH=$root/bisect/$t:$root/.gpu-vendor PYTHONUNBUFFERED=1 CROSSPOOL_COMPILATION_CACHE=/tmp/cc_$t
   echo "=== overlap $(date -u +%T)"
   timeout 90 python -m benchmarks.overlap --requests 32 --prompt 512 --new 128 --rounds 1
   echo "rc=$? $(date -u +%T)") > $OUT/ov_$t.log 2>&1
done
for t in sortfree main; do
  [ $(left) -lt 200 ] && break
  (cd $root/bisect/$t && export PYTHONPATH=$root/bisect/$t:$root/.gpu-vendor PYTHONUNBUFFERED=1 CROSSPOOL_COMPILATION_CACHE=/tmp/cc_$t
   echo "=== profile_step $(date -u +%T)"
   timeout 100 python -m benchmarks.profile_step --prefill 2048 --decode 32,1 --decode-context 2048,43000 --decode-slots 32 --calls 5 --top 6
   echo "rc=$? $(date -u +%T)") > $OUT/ps_$t.log 2>&1
done
if [ $(left) -gt 150 ]; then
 (cd $root/bisect/sortfree && export PYTHONPATH=$root/bisect/sortfree:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/cc_dump XLA_FLAGS="--xla_dump_to=/tmp/dump"
  timeout 75 python -m benchmarks.precompile_bench --models 2 --max-context 131072 --max-slots 64 --threads 1 --programs 3 > /tmp/dump.log 2>&1; echo rc=$? >> /tmp/dump.log)
 python scratch/hlo_count.py /tmp/dump 70 > $OUT/hlo_count.txt 2>&1
 (cd /tmp/dump && ls -S | grep after_optimizations.txt$ | head -2 | xargs tar czf $OUT/hlo2.tgz dump.log 2>/dev/null; cp /tmp/dump.log $OUT/)
fi
for v in "base" "ptxas0 xla_gpu_disable_gpuasm_optimizations=true" "llvmcheap xla_llvm_disable_expensive_passes=true"; do
  set -- $v; name=$1; shift
  [ $(left) -lt 55 ] && break
  opts=(); for o in "$@"; do opts+=(--xla-option "$o"); done
  (cd $root/bisect/sortfree && echo "=== $name $(date -u +%T)" && PYTHONPATH=$root/bisect/sortfree:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/ccf_$name \
   timeout $(( $(left) - 5 < 60 ? $(left) - 5 : 60 )) python -m benchmarks.precompile_bench --models 2 --max-context 131072 --max-slots 64 --threads 1 --programs 3 "${opts[@]}"; echo "rc=$?") >> $OUT/flags.log 2>&1
done
for t in sortfree main; do echo "== $t"; grep -E "overlap on / off|tokens/s" $OUT/ov_$t.log | tail -3; grep -E "^  olmoe-1b-7b |^call|wall" $OUT/ps_$t.log 2>/dev/null | head -8; done
grep -E "^=== |precompiled|rc=" $OUT/flags.log
head -8 $OUT/hlo_count.txt; grep -A3 "^[0-9]* modules" $OUT/hlo_count.txt
