#!/usr/bin/env bash
# Batch-1 decode, where both latency bars are still missed (about 6 minutes; logs go into one archive):
#   1. the GPU tests of the fused decode step (attention that norms, rotates and stores the new token
#      itself: tests/test_fused_ops.py on the GPU), the engine's GPU tests and the kernel-variant checks;
#   2. batch 1 and 4 latency on both shapes at the defaults and with the split-K GEMV routed to some
#      projections (`--decode-gemv`), the floor measured in each run;
#   3. one layer's kernel timeline on the 8B and the 1B at the defaults.
set -u
mkdir -p $OUT/lat
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/lat/setup.log 2>&1
timeout 200 python3 -m pytest -q -x tests/test_fused_ops.py tests/test_gpu_engine.py tests/test_jit_watch.py \
    > $OUT/lat/gpu_tests.log 2>&1
echo "gpu tests: $(grep -E "passed|failed" $OUT/lat/gpu_tests.log | tail -1)" | tee -a $S
grep -E "^FAILED|Error" $OUT/lat/gpu_tests.log | head -5 | tee -a $S
for run in "llama3-8b off" "llama3-8b o" "llama3-8b qkv,o" "llama3.2-1b off" "llama3.2-1b o" \
           "llama3.2-1b row-parallel"; do
  set -- $run
  name=${1}_${2/,/+}
  timeout 80 python3 -m streampage.cli bench latency --model $1 --batch-sizes 1,4 --decode-gemv $2 \
      --output $OUT/lat/$name.json > $OUT/lat/$name.log 2>&1
  { echo "== $1 decode_gemv=$2"; grep -A3 "^ batch" $OUT/lat/$name.log; } | tee -a $S
done
for model in llama3-8b llama3.2-1b; do
  timeout 80 python3 scripts/profile_decode.py $model 1 --timeline 20 > $OUT/lat/profile_$model.log 2>&1
  { echo "== timeline $model"; grep -m1 "=== batch" $OUT/lat/profile_$model.log; tail -21 $OUT/lat/profile_$model.log; } \
      | tee -a $S
done
(cd $OUT && tar czf lat.tgz lat && rm -rf lat)
