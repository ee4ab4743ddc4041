#!/usr/bin/env bash
# Compile levers for issue 15 at HEAD: XLA's autotuning off, Triton GEMMs off (cuBLAS), both;
# the grid's first 3 decode programs, one thread, cold cache each; then the 4K prefill and the
# decode calls with the same flags.
set -u
root=$PWD; start=$(date +%s); D=${DEADLINE:-470}
left() { echo $(( D - ($(date +%s) - start) )); }
export PYTHONUNBUFFERED=1 PYTHONPATH=$root:$root/.gpu-vendor
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv; date -u; } > $OUT/card.txt 2>&1
PB="python -m benchmarks.precompile_bench --models 2 --max-context 131072 --max-slots 64 --threads 1 --programs 3"
v_default=""; v_at0="--xla-option xla_gpu_autotune_level=0"; v_notg="--xla-option xla_gpu_enable_triton_gemm=false"
v_both="$v_at0 $v_notg"
for v in default at0 notg both; do
  [ $(left) -lt 250 ] && break
  eval "o=\${v_$v}"
  echo "=== $v ($o) $(date -u +%T)" >> $OUT/compile.log
  CROSSPOOL_COMPILATION_CACHE=/tmp/ccc_$v timeout 70 $PB $o >> $OUT/compile.log 2>&1; echo "rc=$?" >> $OUT/compile.log
done
f_default=""; f_at0="--xla_gpu_autotune_level=0"; f_notg="--xla_gpu_enable_triton_gemm=false"
for v in at0 default; do
  [ $(left) -lt 110 ] && break
  eval "f=\${f_$v}"
  (export CROSSPOOL_COMPILATION_CACHE=/tmp/ccf_$v XLA_FLAGS="$f"
   timeout 100 python -m benchmarks.prefill --shapes olmoe-1b-7b,qwen3-30b-a3b --prompts 4096 --batch 1 --variants auto --iters 5; echo "rc=$? $(date -u +%T)") > $OUT/prefill_$v.log 2>&1
done
for v in default at0 notg; do
  [ $(left) -lt 60 ] && break
  eval "f=\${f_$v}"
  (export CROSSPOOL_COMPILATION_CACHE=/tmp/ccp_$v XLA_FLAGS="$f"
   timeout $(( $(left) - 5 < 80 ? $(left) - 5 : 80 )) python -m benchmarks.profile_step --decode 32,1 --decode-context 2048,43000 --decode-slots 32 --prefill "" --calls 5 --top 12
   echo "rc=$? $(date -u +%T)") > $OUT/ps_$v.log 2>&1
done
cat $OUT/card.txt; grep -E "^=== |precompiled 3|rc=|phases" $OUT/compile.log
for v in default at0; do echo "== prefill $v"; grep -E "MFU|peak|rc=" $OUT/prefill_$v.log 2>/dev/null | tail -4; done
for v in default at0 notg; do echo "== $v"; grep -E "wall|^  [a-z]" $OUT/ps_$v.log 2>/dev/null | head -16; done
