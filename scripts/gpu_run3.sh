#!/usr/bin/env bash
# Engine figures with CUDA graphs: nano-vllm throughput (with host phase times) and decode latency.
set -u
. scripts/gpu_setup.sh
timeout 150 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/throughput.json 2>&1 | grep -v "oading weights\|capturing" | tail -6
timeout 150 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,16,64,256 --output $OUT/latency_1b.json 2>&1 | grep -v "oading weights\|capturing" | tail -7
timeout 180 python3 -m streampage.cli bench latency --model llama3-8b --batch-sizes 1,32 --output $OUT/latency_8b.json 2>&1 | grep -v "oading weights\|capturing" | tail -5
