#!/usr/bin/env bash
# Issue 9 on nvidia-h200-x2: the tensor-parallel tests on two GPUs (the CPU-side suite runs on CUDA
# there too), then batch-1..256 latency and the nano-vllm workload at TP=1 and TP=2, Llama-3-8B shape.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the host's rule
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
nvidia-smi topo -m >> $OUT/setup.log 2>&1
timeout 240 python3 -m pytest -q -x -rs tests/test_tensor_parallel.py > $OUT/tp_tests.log 2>&1
tail -4 $OUT/tp_tests.log
python3 -c "from streampage.bench.workloads import resolve_model; resolve_model('llama3-8b')"
for tp in 1 2; do
  timeout 150 python3 -m streampage.cli bench latency --model llama3-8b --tensor-parallel-size $tp \
      --batch-sizes 1,32,256 --output $OUT/latency_tp$tp.json > $OUT/latency_tp$tp.log 2>&1
  grep -A5 "tensor parallel" $OUT/latency_tp$tp.log
done
for tp in 1 2; do
  timeout 150 python3 -m streampage.cli bench throughput --model llama3-8b --tensor-parallel-size $tp \
      --output $OUT/throughput_tp$tp.json > $OUT/throughput_tp$tp.log 2>&1
  grep -v "oading weights\|capturing" $OUT/throughput_tp$tp.log | tail -4
done
