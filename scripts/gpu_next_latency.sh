#!/usr/bin/env bash
# Batch-1 decode by GEMV routing, and the throughput check after the fused decode step was reverted
# (about 4 minutes; logs go into one archive):
#   1. the nano-vllm workload at the defaults (no HF baseline);
#   2. batch 1 and 4 latency on both shapes at the defaults and with the split-K GEMV routed to some
#      projections (`--decode-gemv`), the floor measured in each run.
set -u
mkdir -p $OUT/lat
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/lat/setup.log 2>&1
timeout 120 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/lat/tput.json \
    > $OUT/lat/tput.log 2>&1
{ echo "== throughput"; grep -v "WARNING\|capturing\|loading" $OUT/lat/tput.log | tail -4; } | tee -a $S
for run in "llama3-8b off" "llama3-8b qkv,o" "llama3.2-1b off" "llama3.2-1b qkv,o" "llama3.2-1b qkv,o,down"; do
  set -- $run
  name=${1}_${2//,/+}
  timeout 80 python3 -m streampage.cli bench latency --model $1 --batch-sizes 1,4 --decode-gemv $2 \
      --output $OUT/lat/$name.json > $OUT/lat/$name.log 2>&1
  { echo "== $1 decode_gemv=$2"; grep -A3 "^ batch" $OUT/lat/$name.log; } | tee -a $S
done
(cd $OUT && tar czf lat.tgz lat && rm -rf lat)
