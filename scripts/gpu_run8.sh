#!/usr/bin/env bash
# Final figures of the session: GPU tests, throughput, latency, serving, then the HF baseline (longest last).
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
python3 -m pytest -q -x -m gpu tests/test_fused_ops.py 2>&1 | tail -1
python3 -m pytest -q -x "tests/test_llm_parity.py::test_greedy_matches_transformers_on_ragged_batches" tests/test_async_engine.py 2>&1 | tail -1
timeout 120 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/throughput.json > $OUT/throughput.log 2>&1
grep -v "oading weights\|capturing" $OUT/throughput.log | tail -4
timeout 100 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,64,256 --output $OUT/latency_1b.json > $OUT/latency_1b.log 2>&1
grep -v "oading weights\|capturing" $OUT/latency_1b.log | tail -5
timeout 100 python3 -m streampage.cli bench latency --model llama3-8b --batch-sizes 1,32 --output $OUT/latency_8b.json > $OUT/latency_8b.log 2>&1
grep -v "oading weights\|capturing" $OUT/latency_8b.log | tail -4
timeout 170 bash scripts/serving_bench.sh qwen3-0.6b $OUT/serving > $OUT/serving.log 2>&1
tail -3 $OUT/serving.log
timeout 240 python3 - > $OUT/hf.log 2>&1 <<'PY'
import json, os
from streampage.bench.hf_baselines import hf_continuous_batching
from streampage.bench.workloads import nano_vllm_workload, resolve_model
result = hf_continuous_batching(resolve_model("qwen3-0.6b"), nano_vllm_workload(), 0.6)
json.dump(result, open(os.environ["OUT"] + "/hf.json", "w"), indent=2)
print(result)
PY
tail -2 $OUT/hf.log
