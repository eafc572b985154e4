#!/usr/bin/env bash
# One single-GPU call (about 3 minutes): what paging costs paged_decode under other tile configs and
# split counts, and on tables scattered only within 2 MB windows (scripts/probe_decode_paging.py
# --windows); and batch-1 latency at the defaults with the floor taken from the faster of two
# bandwidth measurements. Nsight Compute profiles of the prefill kernels are in
# scripts/gpu_prefill_probe.sh.
set -u
mkdir -p $OUT/pn
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/pn/setup.log 2>&1
timeout 170 python3 scripts/probe_decode_paging.py --reps 4 --windows > $OUT/pn/paging.log 2>&1
{ echo "== paging"; cat $OUT/pn/paging.log | grep -v Warning; } | tee -a $S
for m in "llama3-8b" "llama3.2-1b --decode-gemv qkv,o,down"; do
  name=$(echo $m | cut -d' ' -f1)
  timeout 80 python3 -m streampage.cli bench latency --model $m --batch-sizes 1,4 \
      --output $OUT/pn/latency_$name.json > $OUT/pn/latency_$name.log 2>&1
  { echo "== latency $m"; grep -i "floor\|bandwidth" $OUT/pn/latency_$name.log | head -3;
    grep -A3 "^ batch" $OUT/pn/latency_$name.log; } | tee -a $S
done
(cd $OUT && tar czf pn.tgz pn && rm -rf pn)
