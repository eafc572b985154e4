#!/usr/bin/env bash
# Session 2, call 5: graph split plan for mixed lengths + fused sampler (GPU tests, kernel bench,
# mixed-length probe, throughput), then the issue-7 rate sweep against streampage and HF serve.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 80 python3 -m pytest -q -x tests/test_kernels.py tests/test_gpu_engine.py tests/test_sampling_kernel.py \
    -k "decode or graph_split or gpu or cuda" -m "gpu or not slow" > $OUT/tests.log 2>&1
tail -1 $OUT/tests.log
timeout 60 python3 -m streampage.cli bench kernels --no-flex --output $OUT/kernels.json > $OUT/kernels.log 2>&1
sed -n '/^paged_decode/,/^$/p' $OUT/kernels.log | tail -7
timeout 30 python3 scripts/probe_decode_gemm.py --no-gemm > $OUT/probe.log 2>&1; tail -7 $OUT/probe.log
timeout 45 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/throughput.json \
    > $OUT/throughput.log 2>&1
grep -v "oading weights\|capturing" $OUT/throughput.log | tail -2
RATES=20,60,inf PROMPTS=200 HF_RATES=1 HF_PROMPTS=8 timeout 175 bash scripts/loadtest_h200.sh $OUT/lt > $OUT/lt.log 2>&1
grep -h "=== \|Output token throughput\|Median TTFT\|Median TPOT\|Successful\|Failed" $OUT/lt/*.txt | head -30
