#!/usr/bin/env bash
# The next session's first single-GPU call (about 8-9 minutes; each step starts only if it can end
# before the call's 600 s). Prints a short table; logs go into one archive (at most 8 files return).
#   1. GPU tests: the engine (mixed-step graphs, longest-first decode and GEMV routing against eager
#      tokens; no kernel built by the first requests after the warm-up), the kernels, and the check
#      that sampling, prefill and eager decode build one kernel variant for every step size;
#   2. the kernel table with the prefill config sweep (the heads-outer launch order among it);
#   3. the nano-vllm workload on the Qwen3-0.6B shape on a cold Triton cache, then warm, then with
#      mixed-step graphs of 2,048 and 4,096 tokens: tokens/s, host ms per step, and the kernel variants
#      each timed run built (session 5 saw eager 'launch' at 4.5 ms per step on a cold cache against
#      0.77 ms in session 4, and could not tell compiles from graphs).
set -u
mkdir -p $OUT/next
S=$OUT/summary.txt
START=$SECONDS
LIMIT=${LIMIT:-590}
step() {  # step NAME BUDGET COMMAND...: run COMMAND under `timeout BUDGET` if BUDGET seconds are left
  local name=$1 budget=$2; shift 2
  if (( LIMIT - (SECONDS - START) < budget )); then echo "skipped $name: no time left" | tee -a $S; return 1; fi
  timeout $budget "$@" > $OUT/next/$name.log 2>&1
}
. scripts/gpu_setup.sh > $OUT/next/setup.log 2>&1
export TRITON_CACHE_DIR=/tmp/triton-cold  # a cache of this call's own, empty at the start
step gpu_tests 200 python3 -m pytest -q -x -m gpu tests/test_gpu_engine.py tests/test_kernels_gpu.py \
    tests/test_jit_watch.py -k "not sweep_candidates"
echo "gpu tests: $(tail -1 $OUT/next/gpu_tests.log)" | tee -a $S
step cuda_tests 60 python3 -m pytest -q -x tests/test_mixed_graphs.py tests/test_kernels.py -k "prefill or padded"
echo "prefill and padded-forward tests on CUDA: $(tail -1 $OUT/next/cuda_tests.log)" | tee -a $S
step kernels 120 python3 -m streampage.cli bench kernels --no-flex --prefill-sweep --output $OUT/next/kernels.json
grep -A8 "^     shape splits\|^ tokens seqs" $OUT/next/kernels.log | tee -a $S
grep -i "heads-outer\|best" $OUT/next/kernels.log | head -20 | tee -a $S
export TRITON_CACHE_DIR=/tmp/triton-tput
for run in "cold 0" "warm 0" "graphs2048 2048" "graphs4096 4096"; do
  set -- $run
  step tput_$1 60 python3 -m streampage.cli bench throughput --model qwen3-0.6b --mixed-graph-max-tokens $2 \
      --output $OUT/next/tput_$1.json || continue
  { echo "== throughput $1"; grep -A1 "^system" $OUT/next/tput_$1.log | tail -1
    grep "host ms\|variants built" $OUT/next/tput_$1.log; } | tee -a $S
done
echo "done in $((SECONDS - START)) s" | tee -a $S
(cd $OUT && tar czf next.tgz next && rm -rf next)
