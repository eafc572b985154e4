#!/usr/bin/env bash
# Diagnose: where decode time goes at batch 1 and 256 (kernel table), and the llama3-8b latency failure.
set -u
. scripts/gpu_setup.sh
timeout 150 python3 scripts/profile_decode.py llama3.2-1b 1 256 2>&1 | grep -v "oading weights\|capturing" | tee $OUT/profile.txt | tail -45
CUDA_LAUNCH_BLOCKING=1 timeout 200 python3 -m streampage.cli bench latency --model llama3-8b --batch-sizes 1,32 > $OUT/latency_8b.log 2>&1
tail -30 $OUT/latency_8b.log | grep -v "oading weights\|capturing"
