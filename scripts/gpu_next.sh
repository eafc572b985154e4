#!/usr/bin/env bash
# The next single-GPU call (about 7 minutes): the GPU tests touched since the last run (decode with
# the merge done by the last split, the shared arrival counters, bf16 logits), the kernel table with
# the paired paging cost (issue 4), and batch-1 latency of both shapes (issue 5). Then, as a second
# call, scripts/gpu_next_throughput.sh. On nvidia-h200-x2, run scripts/gpu_tp.sh first (issue 9).
set -u
mkdir -p $OUT/next
. scripts/gpu_setup.sh > $OUT/next/setup.log 2>&1
timeout 150 python3 -m pytest -q -x -m gpu tests/test_kernels_gpu.py tests/test_gpu_engine.py \
    tests/test_cuda_graph_inputs.py tests/test_gemv.py -k "not sweep_candidates and not candidate" \
    > $OUT/next/gpu_tests.log 2>&1
tail -1 $OUT/next/gpu_tests.log
timeout 200 python3 -m streampage.cli bench kernels --no-flex --output $OUT/next/kernels.json \
    > $OUT/next/kernels.log 2>&1
grep -B2 -A8 "^     shape splits" $OUT/next/kernels.log
for model in llama3.2-1b llama3-8b; do
  timeout 90 python3 -m streampage.cli bench latency --model $model --batch-sizes 1 \
      --output $OUT/next/latency_$model.json > $OUT/next/latency_$model.log 2>&1
  grep -A2 "weight-read floor" $OUT/next/latency_$model.log
done
(cd $OUT && tar czf next.tgz next && rm -rf next)
