#!/usr/bin/env bash
# The next session's first single-GPU call (about 8 minutes; on nvidia-h200-x2 run scripts/gpu_tp.sh
# first, issue 9; then scripts/gpu_next_throughput.sh). Prints a short table; logs go into one archive.
#   1. GPU tests of what changed in session 4 without a GPU: paged_prefill's shape-only launch, the
#      mixed-step CUDA graphs against eager tokens, the engine and kernels at large;
#   2. the kernel table (the prefill bar after the launch change; paging; decode);
#   3. mixed steps, eager against graphs: wall and kernel time of 1B steps of 64 decode rows with a
#      160-token prompt prefilled beside them, then without (the load test's TPOT doubled past 20 req/s);
#   4. the load test at 40 and 80 req/s with mixed-step graphs (SERVE_OPTS), streampage only.
set -u
mkdir -p $OUT/next
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/next/setup.log 2>&1
timeout 170 python3 -m pytest -q -x -m gpu tests/test_gpu_engine.py tests/test_kernels_gpu.py -k "not sweep_candidates" \
    > $OUT/next/gpu_tests.log 2>&1
echo "gpu tests: $(tail -1 $OUT/next/gpu_tests.log)" | tee -a $S
timeout 60 python3 -m pytest -q -x tests/test_mixed_graphs.py tests/test_kernels.py -k "prefill or padded" \
    > $OUT/next/cuda_tests.log 2>&1  # unmarked tests that run on CUDA when it is there
echo "prefill and padded-forward tests on CUDA: $(tail -1 $OUT/next/cuda_tests.log)" | tee -a $S
timeout 120 python3 -m streampage.cli bench kernels --no-flex --output $OUT/next/kernels.json > $OUT/next/kernels.log 2>&1
grep -A8 "^     shape splits\|^ tokens seqs" $OUT/next/kernels.log | tee -a $S
for graphs in 0 512; do
  timeout 50 python3 scripts/profile_decode.py llama3.2-1b 64 --mixed 160 --mixed-graph-max-tokens $graphs \
      > $OUT/next/profile_mixed_graphs$graphs.log 2>&1
  { echo "mixed-step graphs up to $graphs tokens:"; grep "=== batch" $OUT/next/profile_mixed_graphs$graphs.log; } | tee -a $S
done
timeout 50 python3 scripts/profile_decode.py llama3.2-1b 64 > $OUT/next/profile_decode_only.log 2>&1
grep "=== batch" $OUT/next/profile_decode_only.log | tee -a $S
SERVE_OPTS="--mixed-graph-max-tokens 512" SKIP_HF=1 RATES=40,80 PROMPTS=300 timeout 130 \
    bash scripts/loadtest_h200.sh $OUT/next/lt > $OUT/next/lt.log 2>&1
grep -h "=== \|Output token throughput\|Median TTFT\|Median TPOT\|P99 TPOT\|Failed" $OUT/next/lt/streampage.txt | tee -a $S
(cd $OUT && tar czf next.tgz next && rm -rf next)
