#!/usr/bin/env bash
# The next GPU session's first call: the issue-7 sweep against streampage and HF `transformers serve`
# (files packed into one archive: the device returns few files), then the throughput bar with HF
# continuous batching in the same run.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
HF_PROMPTS=16 timeout 330 bash scripts/loadtest_h200.sh $OUT/lt > $OUT/lt.log 2>&1
grep -h "=== \|Output token throughput\|Median TTFT\|Median TPOT\|Successful\|Failed" $OUT/lt/*.txt | head -60
(cd $OUT && tar czf lt.tgz lt && rm -rf lt)
timeout 240 python3 -m streampage.cli bench throughput --model qwen3-0.6b --compare hf \
    --output $OUT/throughput.json > $OUT/throughput.log 2>&1
grep -v "oading weights\|capturing" $OUT/throughput.log | tail -5
