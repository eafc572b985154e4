#!/usr/bin/env bash
# The second call of the next session (about 8 minutes): the kernel table with the paired paging
# cost and the one-launch decode (issue 4), then the throughput bar with HF continuous batching in
# the same run (issue 5; HF takes three minutes).
set -u
mkdir -p $OUT/tput
. scripts/gpu_setup.sh > $OUT/tput/setup.log 2>&1
timeout 200 python3 -m streampage.cli bench kernels --no-flex --output $OUT/tput/kernels.json \
    > $OUT/tput/kernels.log 2>&1
grep -B2 -A8 "^     shape splits" $OUT/tput/kernels.log
timeout 300 python3 -m streampage.cli bench throughput --model qwen3-0.6b --compare hf \
    --output $OUT/tput/throughput.json > $OUT/tput/throughput.log 2>&1
grep -v "oading weights\|capturing" $OUT/tput/throughput.log | tail -5
(cd $OUT && tar czf tput.tgz tput && rm -rf tput)
