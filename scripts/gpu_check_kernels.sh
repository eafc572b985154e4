#!/usr/bin/env bash
# One device call: kernel and engine correctness on the GPU, the kernel benchmark, an eager throughput run.
set -u
. scripts/gpu_setup.sh
python3 -m pytest -q -x tests/test_kernels.py tests/test_kernels_gpu.py tests/test_sampler.py 2>&1 | tee $OUT/pytest_kernels.log | tail -25
python3 -m pytest -q -x tests/test_llm_parity.py tests/test_llm_features.py 2>&1 | tee $OUT/pytest_engine.log | tail -15
timeout 240 python3 -m streampage.cli bench kernels --output $OUT/kernels.json 2>&1 | tee $OUT/bench_kernels.log | tail -40
timeout 200 python3 -m streampage.cli bench throughput --model qwen3-0.6b --enforce-eager --output $OUT/throughput_eager.json 2>&1 | tee $OUT/throughput.log | tail -8
