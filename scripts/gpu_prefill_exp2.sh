#!/usr/bin/env bash
# The prefill kernel with packed bf16 exponentials (session 8): its GPU tests, the A/B probe against
# fp32 exponentials in alternating replays, then the whole kernel table (issue 4's bars). About 6
# minutes; logs go into one archive, the summary is printed last.
set -u
mkdir -p $OUT/pf
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/pf/setup.log 2>&1
t0=$SECONDS
timeout 200 python3 -m pytest -q -m gpu tests/test_kernels_gpu.py tests/test_sm90_compile.py > $OUT/pf/gpu_tests.log 2>&1
echo "gpu tests: $(tail -1 $OUT/pf/gpu_tests.log) [$((SECONDS - t0)) s]" | tee -a $S
t0=$SECONDS
timeout 150 python3 scripts/probe_prefill_exp2.py > $OUT/pf/probe.log 2>&1
{ echo "== packed exp2 probe [$((SECONDS - t0)) s]"; tail -7 $OUT/pf/probe.log; } | tee -a $S
t0=$SECONDS
timeout 150 python3 -m streampage.cli bench kernels --no-flex --output $OUT/pf/kernels.json > $OUT/pf/kernels.log 2>&1
{ echo "== kernel table [$((SECONDS - t0)) s]"; grep -A8 "^     shape splits\|^ tokens seqs" $OUT/pf/kernels.log; } | tee -a $S
(cd $OUT && tar czf pf.tgz pf && rm -rf pf)
