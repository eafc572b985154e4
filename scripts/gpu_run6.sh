#!/usr/bin/env bash
# Re-run the two runs that crashed in session 5, keeping full logs.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 150 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,64,256 --output $OUT/latency_1b.json > $OUT/latency_1b.log 2>&1
grep -v "oading weights\|capturing" $OUT/latency_1b.log | grep -B2 -A12 "Error\|batch  median" | head -40
timeout 150 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/throughput.json > $OUT/throughput.log 2>&1
grep -v "oading weights\|capturing" $OUT/throughput.log | grep -B2 -A10 "Error\|workload" | head -30
