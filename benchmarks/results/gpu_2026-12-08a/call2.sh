set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD:$PWD/.gpu-vendor
nvidia-smi --query-gpu=name --format=csv,noheader > $OUT/card.txt
timeout 200 python -m benchmarks.mla_decode_probe --json $OUT/mla2.json \
  --only "default,in order bt64 st2,in order bt64 st2 wg0 4,in order bt64 st2 wg0 5,in order bt64 st2 s1,in order bt64 st2 s3" > $OUT/mla2.log 2>&1
echo "mla rc=$?"; cat $OUT/card.txt; grep "^|" $OUT/mla2.log; grep -i fail $OUT/mla2.log
