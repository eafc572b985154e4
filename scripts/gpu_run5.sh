#!/usr/bin/env bash
# Fused kernels + async scheduling on the GPU: correctness, then kernel, throughput and latency figures.
set -u
. scripts/gpu_setup.sh 2>/dev/null | tail -2
python3 -m pytest -q -x tests/test_fused_ops.py tests/test_llm_features.py tests/test_async_engine.py \
    "tests/test_llm_parity.py::test_greedy_matches_transformers_on_ragged_batches" 2>&1 | tee $OUT/pytest.log | tail -4
python3 -m pytest -q -x -m gpu tests/test_kernels_gpu.py -k prefill 2>&1 | tail -2
timeout 150 python3 -m streampage.cli bench kernels --no-flex --output $OUT/kernels.json 2>&1 | tee $OUT/kernels.log | tail -12
timeout 150 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/throughput.json 2>&1 | grep -v "oading weights\|capturing" | tail -4
timeout 120 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,64,256 --output $OUT/latency_1b.json 2>&1 | grep -v "oading weights\|capturing" | tail -6
timeout 150 python3 -m streampage.cli bench latency --model llama3-8b --batch-sizes 1,32 --output $OUT/latency_8b.json 2>&1 | grep -v "oading weights\|capturing" | tail -5
