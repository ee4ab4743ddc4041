#!/usr/bin/env bash
# Compile per program, one thread, cold cache: 2026-11-29's code (2828d33) vs this tree with the
# bench's warm-up compiles off; the same grid's first programs in the same order.
set -u
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; date -u; git log --oneline -1; } > $OUT/card.txt 2>&1
OUT=$OUT LIMIT=55 bash benchmarks/gpu_compile.sh old1 "tree=bisect/2828d33 --models 2 --threads 1" > /dev/null 2>&1
OUT=$OUT/new LIMIT=45 bash benchmarks/gpu_compile.sh new1 "--models 2 --threads 1 --programs 6" > /dev/null 2>&1
cp $OUT/new/new1.log $OUT/; cat $OUT/new/summary.txt >> $OUT/summary.txt; rm -rf $OUT/new
grep -E "precompiled" $OUT/old1.log $OUT/new1.log | cut -c1-160; cat $OUT/summary.txt
