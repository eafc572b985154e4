#!/usr/bin/env bash
# Issue 5's throughput bar in one call: the nano-vllm workload on the Qwen3-0.6B shape, streampage then
# HF transformers' continuous batching (`generate_batch`) on the same checkpoint and prompts in the
# same run (>= 25,000 tok/s and >= 30x HF). HF's half alone takes about 240 s (more on a slow host).
set -u
mkdir -p $OUT/tput
. scripts/gpu_setup.sh > $OUT/tput/setup.log 2>&1
timeout 560 python3 -m streampage.cli bench throughput --model qwen3-0.6b --compare hf \
    --output $OUT/tput/tput_hf.json > $OUT/tput/tput_hf.log 2>&1
grep -v "WARNING\|capturing\|loading" $OUT/tput/tput_hf.log | tail -8 | tee $OUT/summary.txt
(cd $OUT && tar czf tput.tgz tput && rm -rf tput)
