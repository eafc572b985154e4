#!/usr/bin/env bash
# One single-GPU call that checks the current defaults (about 9 minutes; each step starts only if it
# can end before the call's 600 s). Prints a short table; logs go into one archive (at most 8 files
# return from a call).
#   1. GPU tests: the engine (graphs against eager, longest-first decode, no kernel built by the first
#      requests after the warm-up), the kernels, and the check that sampling, prefill and eager decode
#      build one kernel variant for every step size and table width;
#   2. the kernel table (issue 4's bars; prefill timed against SDPA in alternating replays);
#   3. the nano-vllm workload on the Qwen3-0.6B shape with HF continuous batching in the same run
#      (issue 5's bar: >= 25,000 tok/s and >= 30x HF), with whatever time is left.
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
step gpu_tests 170 python3 -m pytest -q -x -m gpu tests/test_gpu_engine.py tests/test_kernels_gpu.py \
    tests/test_jit_watch.py -k "not sweep_candidates"
echo "gpu tests: $(tail -1 $OUT/next/gpu_tests.log)" | tee -a $S
step kernels 110 python3 -m streampage.cli bench kernels --no-flex --output $OUT/next/kernels.json
grep -A8 "^     shape splits\|^ tokens seqs" $OUT/next/kernels.log | tee -a $S
# Last, with the rest of the call: HF's half alone takes about 240 s, more on a slow host (session 8
# ran past a fixed 300 s budget).
step tput_hf $((LIMIT - (SECONDS - START) - 10)) python3 -m streampage.cli bench throughput --model qwen3-0.6b \
    --compare hf --output $OUT/next/tput_hf.json
{ echo "== throughput with HF"; grep -v "WARNING\|capturing\|loading" $OUT/next/tput_hf.log | tail -6; } | tee -a $S
echo "done in $((SECONDS - START)) s" | tee -a $S
(cd $OUT && tar czf next.tgz next && rm -rf next)
