#!/usr/bin/env bash
# The next session's second single-GPU call, after scripts/gpu_next.sh (about 8-9 minutes). Prints a
# short table; logs go into one archive (a call returns at most 8 files).
#   1. decode probe: mixed lengths, rows longest first, one-tile splits at batch 1-8, paging cost by
#      decode config at B32/8k and B16/4k (issues 4, 5);
#   2. the nano-vllm workload with decode graphs taking rows longest first (`--decode-longest-first`),
#      at 16,384 batched tokens per step (vLLM's offline default on 80 GB GPUs), then at the defaults
#      with HF continuous batching in the same run (issue 5's bar).
set -u
mkdir -p $OUT/tput
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/tput/setup.log 2>&1
timeout 170 python3 scripts/probe_mixed_decode.py > $OUT/tput/probe.log 2>&1
tail -75 $OUT/tput/probe.log | tee -a $S
timeout 70 python3 -m streampage.cli bench throughput --model qwen3-0.6b --decode-longest-first \
    --output $OUT/tput/throughput_longest_first.json > $OUT/tput/throughput_longest_first.log 2>&1
{ echo "== decode graphs longest first"; grep -A3 "^workload" $OUT/tput/throughput_longest_first.log; } | tee -a $S
timeout 70 python3 -m streampage.cli bench throughput --model qwen3-0.6b --max-num-batched-tokens 16384 \
    --output $OUT/tput/throughput_16384.json > $OUT/tput/throughput_16384.log 2>&1
{ echo "== max_num_batched_tokens 16384"; grep -A3 "^workload" $OUT/tput/throughput_16384.log; } | tee -a $S
timeout 280 python3 -m streampage.cli bench throughput --model qwen3-0.6b --compare hf \
    --output $OUT/tput/throughput_hf.json > $OUT/tput/throughput_hf.log 2>&1
{ echo "== with HF"; grep -v "WARNING\|capturing\|loading" $OUT/tput/throughput_hf.log | tail -6; } | tee -a $S
(cd $OUT && tar czf tput.tgz tput && rm -rf tput)
