#!/usr/bin/env bash
# Batch-1 decode on the 8B: where the split-K GEMV's gain on the O projection goes (its kernel beats
# cuBLAS + split-K reduce by ~1.6 us a layer, the step does not get faster; session 8). About 4
# minutes; logs go into one archive:
#   1. one layer's kernel timeline, the kernel means and each kernel's advance of the step over 20
#      steps, with cuBLAS, with the GEMV on O (`--decode-gemv o`), with the GEMV on O but PDL off,
#      and with the GEMV on down only;
#   2. batch 1 and 4 latency for the same four, and the 1B at its best routing, the floor measured
#      in each run.
# RUNS="off;o" times only those routings (`;`-separated `--decode-gemv` arguments).
set -u
mkdir -p $OUT/lat
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/lat/setup.log 2>&1
IFS=';' read -ra runs <<< "${RUNS:-off;o;o --no-programmatic-launch;down}"
for run in "${runs[@]}"; do
  name=8b_$(echo $run | tr -d ' -')
  timeout 80 python3 scripts/profile_decode.py llama3-8b 1 --timeline 22 --decode-gemv $run \
      > $OUT/lat/profile_$name.log 2>&1
  { echo "== timeline llama3-8b --decode-gemv $run"; grep -m1 "=== batch" $OUT/lat/profile_$name.log;
    grep -m4 "nvjet\|_skinny" $OUT/lat/profile_$name.log; grep -A22 "^kernel  " $OUT/lat/profile_$name.log;
    grep -A16 "by advance" $OUT/lat/profile_$name.log; } | tee -a $S
  timeout 60 python3 -m streampage.cli bench latency --model llama3-8b --batch-sizes 1,4 --decode-gemv $run \
      --output $OUT/lat/latency_$name.json > $OUT/lat/latency_$name.log 2>&1
  { echo "== latency llama3-8b --decode-gemv $run"; grep -A3 "^ batch" $OUT/lat/latency_$name.log; } | tee -a $S
done
for gemv in qkv,o,down; do
  timeout 60 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,4 --decode-gemv $gemv \
      --output $OUT/lat/latency_1b_${gemv//,/+}.json > $OUT/lat/latency_1b_${gemv//,/+}.log 2>&1
  { echo "== latency llama3.2-1b --decode-gemv $gemv"; grep -A3 "^ batch" $OUT/lat/latency_1b_${gemv//,/+}.log; } \
      | tee -a $S
done
(cd $OUT && tar czf lat.tgz lat && rm -rf lat)
