#!/usr/bin/env bash
# Session 2, first call: verify async scheduling with CUDA graphs (the padding-row fix), re-measure
# throughput, batch-1 latency and serving with it on, and profile a batch-1 decode step.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 90 python3 -m pytest -q -x tests/test_gpu_engine.py tests/test_fused_ops.py -m gpu > $OUT/tests.log 2>&1
tail -2 $OUT/tests.log
timeout 110 python3 -m streampage.cli bench throughput --model qwen3-0.6b --async-scheduling \
    --output $OUT/throughput_async.json > $OUT/throughput_async.log 2>&1
grep -v "oading weights\|capturing" $OUT/throughput_async.log | tail -4
timeout 100 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,64,256 --async-scheduling \
    --output $OUT/latency_1b.json > $OUT/latency_1b.log 2>&1
grep -v "oading weights\|capturing" $OUT/latency_1b.log | tail -5
timeout 60 python3 scripts/profile_decode.py llama3.2-1b 1 > $OUT/profile_1b.log 2>&1
STREAMPAGE_ASYNC_SCHEDULING=true timeout 170 bash scripts/serving_bench.sh qwen3-0.6b $OUT/serving > $OUT/serving.log 2>&1
tail -1 $OUT/serving.log
