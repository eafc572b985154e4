#!/usr/bin/env bash
# One single-GPU call (about 5 minutes): what paging costs paged_decode under other tile configs and
# split counts, and with one program per sequence reading pages whole for every KV head
# (scripts/probe_decode_paging.py); batch-1 latency at the defaults with the floor taken
# from the faster of two bandwidth measurements; and, where Nsight Compute is installed, the stall
# reasons of the Triton and Gluon prefill kernels at 4096 tokens x 4 (one launch each).
set -u
mkdir -p $OUT/pn
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/pn/setup.log 2>&1
{ echo "== tools"; which ncu nsys 2>&1; ls /usr/local/cuda*/bin 2>/dev/null | grep -i "ncu\|nsys" | head; } | tee -a $S
timeout 170 python3 scripts/probe_decode_paging.py --reps 4 > $OUT/pn/paging.log 2>&1
{ echo "== paging"; cat $OUT/pn/paging.log | grep -v Warning; } | tee -a $S
for m in "llama3-8b" "llama3.2-1b --decode-gemv qkv,o,down"; do
  name=$(echo $m | cut -d' ' -f1)
  timeout 80 python3 -m streampage.cli bench latency --model $m --batch-sizes 1,4 \
      --output $OUT/pn/latency_$name.json > $OUT/pn/latency_$name.log 2>&1
  { echo "== latency $m"; grep -i "floor\|bandwidth" $OUT/pn/latency_$name.log | head -3;
    grep -A3 "^ batch" $OUT/pn/latency_$name.log; } | tee -a $S
done
NCU=$(which ncu 2>/dev/null || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
if [ -n "$NCU" ]; then
  for gluon in False True; do
    timeout 120 $NCU --kernel-name regex:_prefill_kernel --launch-skip 2 --launch-count 1 \
        --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis \
        --section LaunchStats --section Occupancy --section SpeedOfLight \
        python3 -c "
from streampage.bench.kernels import PrefillInputs
from streampage.kernels import PrefillConfig
import torch
i = PrefillInputs(4096, 4)
f = i.paged_call(config=PrefillConfig(128, 128, 8, 3, gluon=$gluon))
for _ in range(4): f()
torch.cuda.synchronize()" > $OUT/pn/ncu_gluon_$gluon.log 2>&1
    { echo "== ncu prefill gluon=$gluon"; grep -i "stall\|issue\|throughput\|registers\|duration\|eligible\|active warps" \
        $OUT/pn/ncu_gluon_$gluon.log | head -40; } | tee -a $S
  done
fi
(cd $OUT && tar czf pn.tgz pn && rm -rf pn)
