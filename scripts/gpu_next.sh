#!/usr/bin/env bash
# The next session's first single-GPU call (about 9 minutes). Prints a short table; logs go into one
# archive (a call returns at most 8 files).
#   1. GPU tests: the engine (mixed-step graphs against eager tokens among them), the kernels, and the
#      check that sampling and paged prefill build one kernel variant for every batch size;
#   2. the kernel table with the prefill config sweep (the heads-outer launch order among it);
#   3. the nano-vllm workload on the Qwen3-0.6B shape on a cold Triton cache, then warm, then with
#      mixed-step graphs of 2,048 and 4,096 tokens: tokens/s, host ms per step, and the kernel variants
#      each timed run built (session 5 saw eager 'launch' at 4.5 ms per step on a cold cache against
#      0.77 ms in session 4, and could not tell compiles from graphs);
#   4. mixed steps, eager against graphs: 1B steps of 64 decode rows beside a 160-token prompt.
set -u
mkdir -p $OUT/next
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/next/setup.log 2>&1
export TRITON_CACHE_DIR=/tmp/triton-cold  # a cache of this call's own, empty at the start
timeout 200 python3 -m pytest -q -x -m gpu tests/test_gpu_engine.py tests/test_kernels_gpu.py tests/test_jit_watch.py \
    -k "not sweep_candidates" > $OUT/next/gpu_tests.log 2>&1
echo "gpu tests: $(tail -1 $OUT/next/gpu_tests.log)" | tee -a $S
timeout 60 python3 -m pytest -q -x tests/test_mixed_graphs.py tests/test_kernels.py -k "prefill or padded" \
    > $OUT/next/cuda_tests.log 2>&1  # unmarked tests that run on CUDA when it is there
echo "prefill and padded-forward tests on CUDA: $(tail -1 $OUT/next/cuda_tests.log)" | tee -a $S
timeout 120 python3 -m streampage.cli bench kernels --no-flex --prefill-sweep --output $OUT/next/kernels.json \
    > $OUT/next/kernels.log 2>&1  # the sweep includes the heads-outer launch order (8k x 4 was 0.67x SDPA)
grep -A8 "^     shape splits\|^ tokens seqs" $OUT/next/kernels.log | tee -a $S
grep -i "heads-outer\|best" $OUT/next/kernels.log | head -20 | tee -a $S
export TRITON_CACHE_DIR=/tmp/triton-tput
for run in "cold 0" "warm 0" "graphs2048 2048" "graphs4096 4096"; do
  set -- $run
  timeout 70 python3 -m streampage.cli bench throughput --model qwen3-0.6b --mixed-graph-max-tokens $2 \
      --output $OUT/next/tput_$1.json > $OUT/next/tput_$1.log 2>&1
  { echo "== throughput $1"; grep -A1 "^system" $OUT/next/tput_$1.log | tail -1; grep "host ms\|variants built" $OUT/next/tput_$1.log; } | tee -a $S
done
for graphs in 0 512; do
  timeout 50 python3 scripts/profile_decode.py llama3.2-1b 64 --mixed 160 --mixed-graph-max-tokens $graphs \
      > $OUT/next/profile_mixed_graphs$graphs.log 2>&1
  { echo "mixed-step graphs up to $graphs tokens:"; grep "=== batch" $OUT/next/profile_mixed_graphs$graphs.log; } | tee -a $S
done
(cd $OUT && tar czf next.tgz next && rm -rf next)
