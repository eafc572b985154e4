#!/usr/bin/env bash
# The next single-GPU call (about 9 minutes): the GPU tests touched since the last run, the kernel table
# with the paired paging cost (issue 4), then the throughput bar with HF continuous batching in the
# same run (issue 5). On nvidia-h200-x2, run scripts/gpu_tp.sh first (issue 9).
set -u
mkdir -p $OUT/next
. scripts/gpu_setup.sh > $OUT/next/setup.log 2>&1
timeout 90 python3 -m pytest -q -x -m gpu tests/test_gpu_engine.py tests/test_cuda_graph_inputs.py \
    tests/test_sampling_kernel.py > $OUT/next/gpu_tests.log 2>&1
tail -1 $OUT/next/gpu_tests.log
timeout 200 python3 -m streampage.cli bench kernels --no-flex --output $OUT/next/kernels.json \
    > $OUT/next/kernels.log 2>&1
grep -B2 -A8 "^     shape splits" $OUT/next/kernels.log
timeout 240 python3 -m streampage.cli bench throughput --model qwen3-0.6b --compare hf \
    --output $OUT/next/throughput.json > $OUT/next/throughput.log 2>&1
grep -v "oading weights\|capturing" $OUT/next/throughput.log | tail -5
(cd $OUT && tar czf next.tgz next && rm -rf next)
