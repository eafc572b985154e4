#!/usr/bin/env bash
# One call on nvidia-h200-x2: the two-GPU tensor-parallel tests (issue 9), then the issue-7 rate sweep
# against streampage and HF `transformers serve` on GPU 0 (files packed into one archive).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the host's rule
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 170 python3 -m pytest -v -m gpu -o faulthandler_timeout=80 -rs --durations=0 tests/test_tensor_parallel.py 2>&1 \
    | grep -v "nanobind\|leaked\|refleaks" | tee $OUT/tp_gpu_tests.log | grep -E "PASS|FAIL|ERROR|Timeout|passed|failed|s call"
export CUDA_VISIBLE_DEVICES=0
RATES=10,20,40,80,inf PROMPTS=300 HF_PROMPTS=16 timeout 330 bash scripts/loadtest_h200.sh $OUT/lt > $OUT/lt.log 2>&1
grep -h "=== \|Output token throughput\|Median TTFT\|Median TPOT\|Successful\|Failed" $OUT/lt/*.txt | head -60
(cd $OUT && tar czf lt.tgz lt && rm -rf lt)
