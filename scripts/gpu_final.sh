#!/usr/bin/env bash
# Session 4's last call (about 6 minutes): GPU tests of the decode changes (PDL on by default, one-tile
# decode splits at batch 1-8, the GEMV without its SiLU prologue), then batch 1 and 8 latency on both
# shapes with the new defaults and with --decode-gemv, and the nano-vllm throughput (no HF: issue 5).
set -u
mkdir -p $OUT/final
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/final/setup.log 2>&1
timeout 170 python3 -m pytest -q -m gpu tests/test_gpu_engine.py tests/test_gemv.py tests/test_kernels_gpu.py \
    -k "not sweep_candidates" > $OUT/final/gpu_tests.log 2>&1
echo "gpu tests: $(tail -1 $OUT/final/gpu_tests.log)" | tee -a $S
latency() {  # model, label, options...
  local model=$1 label=$2; shift 2
  timeout 100 python3 -m streampage.cli bench latency --model $model --batch-sizes 1,8 "$@" \
      --output $OUT/final/latency_${model}_$label.json > $OUT/final/latency_${model}_$label.log 2>&1
  { echo "== $model $label"; grep -A3 "weight-read floor" $OUT/final/latency_${model}_$label.log; } | tee -a $S
}
latency llama3.2-1b default
latency llama3-8b default
latency llama3.2-1b gemv --decode-gemv
latency llama3-8b gemv --decode-gemv
timeout 120 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/final/throughput.json \
    > $OUT/final/throughput.log 2>&1
grep -A4 "^workload" $OUT/final/throughput.log | tee -a $S
(cd $OUT && tar czf final.tgz final && rm -rf final)
