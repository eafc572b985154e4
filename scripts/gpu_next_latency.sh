#!/usr/bin/env bash
# Batch-1 decode, where both latency bars are still missed (about 7 minutes; logs go into one archive):
#   1. one layer's kernel timeline on the 8B with cuBLAS and with the split-K GEMV on the O and down
#      projections (`--decode-gemv row-parallel`), which beat cuBLAS in isolation (session 3) yet made
#      the 8B 2% slower in the model (session 6), and on the 1B at the defaults;
#   2. batch 1 and 4 latency on both shapes, cuBLAS against row-parallel, the floor measured in each run;
#   3. the decode probe (its batch 1-8 table times one-tile, two-tile and 256-token splits).
set -u
mkdir -p $OUT/lat
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/lat/setup.log 2>&1
for run in "llama3-8b off" "llama3-8b row-parallel" "llama3.2-1b off"; do
  set -- $run
  timeout 80 python3 scripts/profile_decode.py $1 1 --timeline 22 --decode-gemv $2 \
      > $OUT/lat/profile_$1_$2.log 2>&1
  { echo "== timeline $1 decode_gemv=$2"; tail -23 $OUT/lat/profile_$1_$2.log; } | tee -a $S
done
for model in llama3.2-1b llama3-8b; do
  for gemv in off row-parallel; do
    timeout 80 python3 -m streampage.cli bench latency --model $model --batch-sizes 1,4 --decode-gemv $gemv \
        --output $OUT/lat/${model}_$gemv.json > $OUT/lat/${model}_$gemv.log 2>&1
    { echo "== $model decode_gemv=$gemv"; grep -A3 "^ batch" $OUT/lat/${model}_$gemv.log; } | tee -a $S
  done
done
timeout 170 python3 scripts/probe_mixed_decode.py > $OUT/lat/probe.log 2>&1
grep -A17 "^graph plan at batch 1-8" $OUT/lat/probe.log | tee -a $S
(cd $OUT && tar czf lat.tgz lat && rm -rf lat)
