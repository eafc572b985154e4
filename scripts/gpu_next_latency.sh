#!/usr/bin/env bash
# Batch-1 decode with RMSNorm folded into the GEMV of QKV and gate/up (`norm_skinny_linear`, used
# wherever `--decode-gemv` routes those projections), about 4 minutes, most important first:
#   1. GPU tests of the fused norm: whole decoder layers and a graph-replayed decode step with the GEMV
#      on every projection against PyTorch, the GEMV tests, the engine run through the GEMV;
#   2. batch 1 and 4 latency by routing on both shapes, the floor measured in each run.
set -u
mkdir -p $OUT/lat
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/lat/setup.log 2>&1
timeout 90 python3 -m pytest -q -x tests/test_fused_ops.py tests/test_gemv.py tests/test_gpu_engine.py \
    -k "decoder_layer or replays or norm or chain or through_the_gemv" > $OUT/lat/gpu_tests.log 2>&1
echo "gpu tests: $(grep -E "passed|failed" $OUT/lat/gpu_tests.log | tail -1)" | tee -a $S
grep -E "^FAILED|Error" $OUT/lat/gpu_tests.log | head -5 | tee -a $S
for run in "llama3-8b off" "llama3-8b qkv,o" "llama3.2-1b off" "llama3.2-1b all" "llama3.2-1b qkv,o,down" \
           "llama3-8b qkv"; do
  set -- $run
  name=${1}_${2//,/+}
  timeout 60 python3 -m streampage.cli bench latency --model $1 --batch-sizes 1,4 --decode-gemv $2 \
      --output $OUT/lat/$name.json > $OUT/lat/$name.log 2>&1
  { echo "== $1 decode_gemv=$2"; grep -A3 "^ batch" $OUT/lat/$name.log; } | tee -a $S
  (cd $OUT && tar czf lat.tgz lat)  # what has run so far comes back even if the call is cut short
done
(cd $OUT && tar czf lat.tgz lat && rm -rf lat)
