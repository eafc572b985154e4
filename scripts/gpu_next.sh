#!/usr/bin/env bash
# The next GPU session's first call: verify async scheduling with CUDA graphs (the padding-row fix),
# then re-measure throughput, latency and serving with it on, and time the prefill sweep.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
python3 -m pytest -q -x tests/test_gpu_engine.py tests/test_fused_ops.py -m gpu 2>&1 | tail -2
timeout 120 python3 -m streampage.cli bench throughput --model qwen3-0.6b --async-scheduling \
    --output $OUT/throughput_async.json > $OUT/throughput_async.log 2>&1
grep -v "oading weights\|capturing" $OUT/throughput_async.log | tail -4
timeout 100 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,64,256 --async-scheduling \
    --output $OUT/latency_1b.json > $OUT/latency_1b.log 2>&1
grep -v "oading weights\|capturing" $OUT/latency_1b.log | tail -5
STREAMPAGE_ASYNC_SCHEDULING=true timeout 170 bash scripts/serving_bench.sh qwen3-0.6b $OUT/serving > $OUT/serving.log 2>&1
tail -1 $OUT/serving.log
timeout 240 python3 -m streampage.cli bench kernels --no-flex --prefill-sweep --output $OUT/kernels.json > $OUT/kernels.log 2>&1
tail -25 $OUT/kernels.log
