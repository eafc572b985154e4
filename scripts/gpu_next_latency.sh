#!/usr/bin/env bash
# Batch-1 decode, where both latency bars are still missed (about 8 minutes; logs go into one archive):
#   1. the GPU tests of the fused decode step (attention that norms, rotates and stores the new token
#      itself: tests/test_fused_ops.py on the GPU), the engine's GPU tests and the kernel-variant checks;
#   2. batch 1 and 4 latency on both shapes at the defaults and with the split-K GEMV routed to some
#      projections (`--decode-gemv`; a Triton QKV projection lets attention start under its tail);
#   3. one layer's kernel timeline on the 8B, cuBLAS against the GEMV for QKV;
#   4. the nano-vllm workload at the defaults (no HF baseline: a regression check of the fused decode).
set -u
mkdir -p $OUT/lat
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/lat/setup.log 2>&1
timeout 200 python3 -m pytest -q -x tests/test_fused_ops.py tests/test_gpu_engine.py tests/test_jit_watch.py \
    > $OUT/lat/gpu_tests.log 2>&1
echo "gpu tests: $(grep -E "passed|failed" $OUT/lat/gpu_tests.log | tail -1)" | tee -a $S
grep -E "^FAILED|Error" $OUT/lat/gpu_tests.log | head -5 | tee -a $S
for run in "llama3-8b off" "llama3-8b qkv" "llama3-8b qkv,o" "llama3.2-1b off" "llama3.2-1b qkv" \
           "llama3.2-1b row-parallel" "llama3.2-1b qkv,o,down"; do
  set -- $run
  name=${1}_${2//,/+}
  timeout 80 python3 -m streampage.cli bench latency --model $1 --batch-sizes 1,4 --decode-gemv $2 \
      --output $OUT/lat/$name.json > $OUT/lat/$name.log 2>&1
  { echo "== $1 decode_gemv=$2"; grep -A3 "^ batch" $OUT/lat/$name.log; } | tee -a $S
done
for gemv in off qkv; do
  timeout 80 python3 scripts/profile_decode.py llama3-8b 1 --timeline 11 --decode-gemv $gemv \
      > $OUT/lat/profile_8b_$gemv.log 2>&1
  { echo "== timeline llama3-8b decode_gemv=$gemv"; grep -m1 "=== batch" $OUT/lat/profile_8b_$gemv.log;
    tail -12 $OUT/lat/profile_8b_$gemv.log; } | tee -a $S
done
timeout 120 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/lat/tput.json \
    > $OUT/lat/tput.log 2>&1
{ echo "== throughput"; grep -v "WARNING\|capturing\|loading" $OUT/lat/tput.log | tail -4; } | tee -a $S
(cd $OUT && tar czf lat.tgz lat && rm -rf lat)
