#!/usr/bin/env bash
# Session 2, call 4: balanced decode splits (kernel + engine GPU tests, mixed-length probe), then
# throughput, serving and batch-1 latency with async scheduling on by default and the GC freeze.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 120 python3 -m pytest -q -x tests/test_kernels.py tests/test_gpu_engine.py -k "decode or balanced or gpu" \
    > $OUT/tests.log 2>&1
tail -1 $OUT/tests.log
timeout 60 python3 scripts/probe_decode_gemm.py --no-gemm > $OUT/probe.log 2>&1; cat $OUT/probe.log
timeout 60 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/throughput.json \
    > $OUT/throughput.log 2>&1
grep -v "oading weights\|capturing" $OUT/throughput.log | tail -2
timeout 150 bash scripts/serving_bench.sh qwen3-0.6b $OUT/serving > $OUT/serving.log 2>&1
grep "Client CPU\|tokens per chunk" $OUT/serving.log; tail -1 $OUT/serving.log
timeout 50 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,256 \
    --output $OUT/latency_1b.json > $OUT/latency_1b.log 2>&1
grep -v "oading weights\|capturing" $OUT/latency_1b.log | tail -3
timeout 80 python3 -m streampage.cli bench latency --model llama3-8b --batch-sizes 1 \
    --output $OUT/latency_8b.json > $OUT/latency_8b.log 2>&1
grep -v "oading weights\|capturing" $OUT/latency_8b.log | tail -2
