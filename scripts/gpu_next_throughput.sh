#!/usr/bin/env bash
# The throughput bar of issue 5 with HF continuous batching in the same run (about 5 minutes: HF
# takes three of them).
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 300 python3 -m streampage.cli bench throughput --model qwen3-0.6b --compare hf \
    --output $OUT/throughput.json > $OUT/throughput.log 2>&1
grep -v "oading weights\|capturing" $OUT/throughput.log | tail -5
