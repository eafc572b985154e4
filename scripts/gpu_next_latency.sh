#!/usr/bin/env bash
# Batch-1 decode latency by GEMV routing (about 5 minutes): cuBLAS everywhere, the split-K GEMV for
# every projection, and the GEMV for the O and down projections only (where session 3's GEMV table
# showed cuBLAS furthest from the bandwidth at one row), on the Llama-3.2-1B and Llama-3-8B shapes, each
# in its own process, the floor measured in each run. Logs go into one archive.
set -u
mkdir -p $OUT/lat
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/lat/setup.log 2>&1
for model in llama3.2-1b llama3-8b; do
  python3 -c "from streampage.bench.workloads import resolve_model; resolve_model('$model')"
  for gemv in off row-parallel all; do
    timeout 80 python3 -m streampage.cli bench latency --model $model --batch-sizes 1,4 --decode-gemv $gemv \
        --output $OUT/lat/${model}_$gemv.json > $OUT/lat/${model}_$gemv.log 2>&1
    { echo "== $model decode_gemv=$gemv"; grep -A3 "^ batch" $OUT/lat/${model}_$gemv.log; } | tee -a $S
  done
done
(cd $OUT && tar czf lat.tgz lat && rm -rf lat)
