#!/usr/bin/env bash
# One single-GPU call for issue 4's bars at the defaults (about 8 minutes; each step starts only if
# its budget fits in the call's 600 s). Prints a short table; logs go into one archive (at most 8 files
# return from a call). The throughput bar run with HF needs a call of its own: scripts/gpu_tput_hf.sh.
#   1. GPU tests: the engine (graphs against eager, HF agreement, longest-first decode, no kernel built
#      by the first requests after the warm-up), the kernels (the Gluon prefill's own tests included),
#      the sampler, and the check that sampling, prefill and eager decode build one kernel variant for
#      every step size and table width;
#   2. the kernel table (issue 4's bars; prefill timed against SDPA in alternating replays);
#   3. the paging cost by decode config (scripts/probe_decode_paging.py;
#      every prefill config paired with SDPA is scripts/probe_prefill_configs.py);
#   4. the nano-vllm throughput, streampage alone.
# PAGING=0 and THROUGHPUT=0 skip steps 3 and 4.
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
step gpu_tests 200 python3 -m pytest -q -m gpu tests/test_gpu_engine.py tests/test_kernels_gpu.py \
    tests/test_sampling_kernel.py tests/test_jit_watch.py -k "not sweep_candidates"
{ echo "gpu tests: $(tail -1 $OUT/next/gpu_tests.log)"; grep "^FAILED" $OUT/next/gpu_tests.log | head -8; } | tee -a $S
step kernels 110 python3 -m streampage.cli bench kernels --no-flex --output $OUT/next/kernels.json
grep -A8 "^     shape splits\|^ tokens seqs" $OUT/next/kernels.log | tee -a $S
if [ "${PAGING:-1}" != 0 ]; then
  step paging 150 python3 scripts/probe_decode_paging.py --reps 3
  { echo "== paging by decode config"; grep -v Warning $OUT/next/paging.log; } | tee -a $S
fi
if [ "${THROUGHPUT:-1}" != 0 ]; then
  step throughput 120 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/next/tput.json
  { echo "== throughput"; grep -v "WARNING\|capturing\|loading" $OUT/next/throughput.log | tail -5; } | tee -a $S
fi
echo "done in $((SECONDS - START)) s" | tee -a $S
(cd $OUT && tar czf next.tgz next && rm -rf next)
