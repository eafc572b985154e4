#!/usr/bin/env bash
# Issue 9 on nvidia-h200-x2: the two-GPU tensor-parallel tests (what the bar still lacks), then, in
# the time left, batch-1..256 latency and the nano-vllm workload at TP=1 and TP=2 on the Llama-3-8B
# shape (measured in session 3). Logs are packed into one archive (the device returns at most 8 files).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the host's rule
START=$SECONDS
mkdir -p $OUT/tp
. scripts/gpu_setup.sh > $OUT/tp/setup.log 2>&1
nvidia-smi topo -m >> $OUT/tp/setup.log 2>&1
timeout 300 python3 -m pytest -v -m gpu -o faulthandler_timeout=90 -rs --durations=0 tests/test_tensor_parallel.py 2>&1 \
    | grep -v "nanobind\|leaked\|refleaks" > $OUT/tp/gpu_tests.log
grep -E "PASS|FAIL|ERROR|Timeout|passed|failed|s call" $OUT/tp/gpu_tests.log
if (( SECONDS - START < 330 )); then
  python3 -c "from streampage.bench.workloads import resolve_model; resolve_model('llama3-8b')"
  for tp in 1 2; do
    timeout 110 python3 -m streampage.cli bench latency --model llama3-8b --tensor-parallel-size $tp \
        --batch-sizes 1,32,256 --output $OUT/tp/latency_tp$tp.json > $OUT/tp/latency_tp$tp.log 2>&1
    grep -A5 "tensor parallel" $OUT/tp/latency_tp$tp.log
  done
fi
(cd $OUT && tar czf tp.tgz tp && rm -rf tp)
