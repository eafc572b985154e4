#!/usr/bin/env bash
# Second device call: CUDA-graph engine figures (throughput, latency), host-time profile, swap diagnostic.
set -u
. scripts/gpu_setup.sh
python3 scripts/diag_swap.py 2>&1 | grep -v "loading weights" | tail -6
timeout 150 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/throughput.json 2>&1 | grep -v "loading weights\|capturing" | tail -5
timeout 150 python3 -m cProfile -o $OUT/throughput.prof -m streampage.cli bench throughput --model qwen3-0.6b >/dev/null 2>&1
python3 -c "import pstats; pstats.Stats('$OUT/throughput.prof').sort_stats('tottime').print_stats(22)" | tail -32
timeout 150 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,16,64,256 --output $OUT/latency_1b.json 2>&1 | grep -v "loading weights\|capturing" | tail -7
timeout 180 python3 -m streampage.cli bench latency --model llama3-8b --batch-sizes 1,32,128 --output $OUT/latency_8b.json 2>&1 | grep -v "loading weights\|capturing" | tail -6
