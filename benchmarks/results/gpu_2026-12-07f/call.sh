#!/usr/bin/env bash
# 1) MLA decode with two value warpgroups against the default (+ correctness on NaN-poisoned
# arenas); 2) the sampling's CUB-eligible sort (this tree) against HEAD's argsort (bisect/base):
# compile per program, one thread, cold cache; decode calls' kernels; overlap; kernel count.
set -u
root=$PWD; start=$(date +%s); D=${DEADLINE:-560}
left() { echo $(( D - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; date -u; git log --oneline -1; } > $OUT/card.txt 2>&1
(export PYTHONPATH=$root:$root/.gpu-vendor
 timeout 170 python -m benchmarks.mla_decode_probe --only "default,vw2,vw2 c1,vw2 c2,r128,vw2 r128,vw2 s4,vw2 bt64 st2" > $OUT/mla.log 2>&1
 echo "mla rc=$? $(date -u +%T)" >> $OUT/card.txt
 timeout 80 python benchmarks/kernels.py --with-mgpu --mla-only --correctness-only > $OUT/kernels.log 2>&1
 echo "kernels rc=$? $(date -u +%T)" >> $OUT/card.txt)
for t in base new; do
  [ $(left) -lt 200 ] && break
  d=$root; [ $t = base ] && d=$root/bisect/base
  (cd $d && echo "=== $t $(date -u +%T)" && PYTHONPATH=$d:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/ccc_$t \
   timeout 75 python -m benchmarks.precompile_bench --models 2 --max-context 131072 --max-slots 64 --threads 1 --programs 3; echo "rc=$?") >> $OUT/compile.log 2>&1
done
for t in new base; do
  [ $(left) -lt 110 ] && break
  d=$root; [ $t = base ] && d=$root/bisect/base
  (cd $d && export PYTHONPATH=$d:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/ccp_$t
   timeout 100 python -m benchmarks.profile_step --decode 32,1 --decode-context 2048,43000 --decode-slots 32 --prefill "" --calls 5 --top 8
   echo "rc=$? $(date -u +%T)") > $OUT/ps_$t.log 2>&1
done
if [ $(left) -gt 80 ]; then
  (export PYTHONPATH=$root:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/cco
   timeout 75 python -m benchmarks.overlap --requests 32 --prompt 512 --new 128 --rounds 1; echo "rc=$?") > $OUT/ov_new.log 2>&1
fi
if [ $(left) -gt 45 ]; then
  (export PYTHONPATH=$root:$root/.gpu-vendor CROSSPOOL_COMPILATION_CACHE=/tmp/ccd XLA_FLAGS="--xla_dump_to=/tmp/dump"
   timeout $(( $(left) - 10 )) python -m benchmarks.precompile_bench --models 2 --max-context 131072 --max-slots 64 --threads 1 --programs 2 > /tmp/dump.log 2>&1
   python -m benchmarks.hlo_kernels /tmp/dump > $OUT/hlo.txt 2>&1; grep -c "" /tmp/dump.log >> $OUT/hlo.txt)
fi
cat $OUT/card.txt; grep -E "^\||FAILED" $OUT/mla.log; grep -iE "mgpu|FAIL" $OUT/kernels.log | tail -12
grep -E "^=== |precompiled|rc=" $OUT/compile.log
for t in new base; do echo "== $t"; grep -E "^  olmoe|wall|sort|top-k" $OUT/ps_$t.log 2>/dev/null | head -10; done
grep -E "overlap on / off|tokens/s" $OUT/ov_new.log | tail -3; head -30 $OUT/hlo.txt
