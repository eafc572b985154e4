#!/usr/bin/env bash
# The next session's single-GPU call (about 8-10 minutes; on nvidia-h200-x2 run scripts/gpu_tp.sh first,
# issue 9). Prints a short table; logs go into one archive (a call returns at most 8 files).
#   1. mixed steps: wall against kernel time of 1B steps of 64 decode rows with and without a
#      160-token prompt prefilled beside them (eager; the load test's TPOT doubled past 20 req/s);
#   2. decode probe: mixed lengths, rows longest first, one-tile splits at batch 1-8, paging cost by
#      decode config at B32/8k and B16/4k (issues 4, 5);
#   3. the nano-vllm workload at 16,384 batched tokens per step (vLLM's offline default on 80 GB GPUs),
#      then at the default 8,192 with HF continuous batching in the same run (issue 5's bar).
set -u
mkdir -p $OUT/next
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/next/setup.log 2>&1
for mixed in 0 160; do
  timeout 60 python3 scripts/profile_decode.py llama3.2-1b 64 --mixed $mixed > $OUT/next/profile_mixed$mixed.log 2>&1
  grep "=== batch" $OUT/next/profile_mixed$mixed.log | tee -a $S
done
timeout 170 python3 scripts/probe_mixed_decode.py > $OUT/next/probe.log 2>&1
tail -75 $OUT/next/probe.log | tee -a $S
timeout 70 python3 -m streampage.cli bench throughput --model qwen3-0.6b --max-num-batched-tokens 16384 \
    --output $OUT/next/throughput_16384.json > $OUT/next/throughput_16384.log 2>&1
{ echo "== max_num_batched_tokens 16384"; grep -A3 "^workload" $OUT/next/throughput_16384.log; } | tee -a $S
timeout 280 python3 -m streampage.cli bench throughput --model qwen3-0.6b --compare hf \
    --output $OUT/next/throughput_hf.json > $OUT/next/throughput_hf.log 2>&1
{ echo "== with HF"; grep -v "WARNING\|capturing\|loading" $OUT/next/throughput_hf.log | tail -6; } | tee -a $S
(cd $OUT && tar czf next.tgz next && rm -rf next)
