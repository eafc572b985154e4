#!/usr/bin/env bash
# Session 2: verify the early D2H copy of sampled tokens (async scheduling overlap), re-measure
# throughput, batch-1 latency and serving with async scheduling on, and profile decode steps.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 90 python3 -m pytest -q -x tests/test_gpu_engine.py tests/test_fused_ops.py -m gpu > $OUT/tests.log 2>&1
tail -1 $OUT/tests.log
for mode in --async-scheduling --no-async-scheduling; do
  timeout 60 python3 -m streampage.cli bench throughput --model qwen3-0.6b $mode > $OUT/throughput$mode.log 2>&1
  grep -v "oading weights\|capturing" $OUT/throughput$mode.log | tail -2
done
timeout 80 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,64,256 --async-scheduling \
    --output $OUT/latency_1b.json > $OUT/latency_1b.log 2>&1
grep -v "oading weights\|capturing" $OUT/latency_1b.log | tail -4
timeout 100 python3 -m streampage.cli bench latency --model llama3-8b --batch-sizes 1,32 --async-scheduling \
    --output $OUT/latency_8b.json > $OUT/latency_8b.log 2>&1
grep -v "oading weights\|capturing" $OUT/latency_8b.log | tail -3
timeout 60 python3 scripts/profile_decode.py llama3.2-1b 1 --async-scheduling > $OUT/profile_1b.log 2>&1
timeout 60 python3 scripts/profile_decode.py qwen3-0.6b 256 --async-scheduling --temperature 0.6 > $OUT/profile_06b.log 2>&1
grep "===" $OUT/profile_*.log
STREAMPAGE_ASYNC_SCHEDULING=true timeout 150 bash scripts/serving_bench.sh qwen3-0.6b $OUT/serving > $OUT/serving.log 2>&1
tail -1 $OUT/serving.log
