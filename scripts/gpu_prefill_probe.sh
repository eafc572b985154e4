#!/usr/bin/env bash
# One single-GPU call (about 7 minutes) for the prefill kernels: the Gluon kernel's GPU tests, every
# prefill config paired with SDPA (scripts/probe_prefill_configs.py), Nsight Compute's stall reasons
# per issued instruction for the Triton default and the two Gluon shapes at 4096 tokens x 4 (one launch
# each, clocks locked by ncu), and unless THROUGHPUT=0 the nano-vllm throughput (no HF half:
# scripts/gpu_tput_hf.sh).
set -u
mkdir -p $OUT/pp
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/pp/setup.log 2>&1
timeout 150 python3 -m pytest -q -m gpu tests/test_kernels_gpu.py -k gluon > $OUT/pp/gpu_tests.log 2>&1
{ echo "gpu tests: $(tail -1 $OUT/pp/gpu_tests.log)"; grep "^FAILED" $OUT/pp/gpu_tests.log | head -8; } | tee -a $S
timeout 200 python3 scripts/probe_prefill_configs.py --reps 3 > $OUT/pp/prefill_configs.log 2>&1
{ echo "== prefill configs paired with SDPA"; tail -23 $OUT/pp/prefill_configs.log; } | tee -a $S
NCU=$(which ncu 2>/dev/null || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
for cfg in "128, 128, 8, 3" "128, 128, 8, 3, gluon=True" "128, 64, 8, 4, gluon=True" "64, 64, 4, 3, gluon=True"; do
  name=$(echo "$cfg" | tr -d ' =,' )
  timeout 90 $NCU --kernel-name regex:_prefill_kernel --launch-skip 2 --launch-count 1 \
      --section SpeedOfLight --section ComputeWorkloadAnalysis --section Occupancy \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 -c "
from streampage.bench.kernels import PrefillInputs
from streampage.kernels import PrefillConfig
import torch
i = PrefillInputs(4096, 4)
f = i.paged_call(config=PrefillConfig($cfg))
for _ in range(4): f()
torch.cuda.synchronize()" > $OUT/pp/ncu_$name.log 2>&1
  { echo "== ncu PrefillConfig($cfg)"; grep -i "duration\|Compute (SM)\|highest-utilized\|Achieved Active\|Registers Per" $OUT/pp/ncu_$name.log;
    grep "issue_stalled" $OUT/pp/ncu_$name.log | awk '{print $NF, $1}' | sort -gr | head -9; } | tee -a $S
done
[ "${THROUGHPUT:-1}" = 1 ] && timeout 150 python3 -m streampage.cli bench throughput --model qwen3-0.6b --output $OUT/pp/tput.json > $OUT/pp/tput.log 2>&1
[ "${THROUGHPUT:-1}" = 1 ] && { echo "== throughput"; grep -v "WARNING\|capturing\|loading" $OUT/pp/tput.log | tail -6; } | tee -a $S
(cd $OUT && tar czf pp.tgz pp && rm -rf pp)
