#!/usr/bin/env bash
# The next single-GPU call (about 8 minutes; then gpu_next_throughput.sh and gpu_next_loadtest.sh): the GPU tests touched since the last run (one-launch
# split-KV decode, shared arrival counters, bf16 logits, PDL and the decode GEMV), then batch-1 and
# batch-8 latency with the decode options off and on (issue 5). Then, as a second call,
# scripts/gpu_next_throughput.sh. On nvidia-h200-x2, run scripts/gpu_tp.sh first (issue 9).
set -u
mkdir -p $OUT/next
. scripts/gpu_setup.sh > $OUT/next/setup.log 2>&1
timeout 200 python3 -m pytest -q -x -m gpu tests/test_kernels_gpu.py tests/test_gpu_engine.py \
    tests/test_cuda_graph_inputs.py tests/test_fused_ops.py tests/test_gemv.py -k "not sweep_candidates" \
    > $OUT/next/gpu_tests.log 2>&1
tail -1 $OUT/next/gpu_tests.log
run_latency() {  # model, label, options...
  local model=$1 label=$2; shift 2
  timeout 100 python3 -m streampage.cli bench latency --model $model --batch-sizes 1,8 "$@" \
      --output $OUT/next/latency_${model}_$label.json > $OUT/next/latency_${model}_$label.log 2>&1
  echo "== $model $label"; grep -A3 "weight-read floor" $OUT/next/latency_${model}_$label.log
}
run_latency llama3.2-1b cublas
run_latency llama3.2-1b gemv --decode-gemv
run_latency llama3.2-1b gemv_pdl --decode-gemv --programmatic-launch
run_latency llama3-8b cublas
run_latency llama3-8b gemv_pdl --decode-gemv --programmatic-launch
(cd $OUT && tar czf next.tgz next && rm -rf next)
