#!/usr/bin/env bash
# Issue 7's sweep again, now with cold prompts at every point (about 6 minutes): streampage at
# 10-80 req/s and all at once, then HF `transformers serve` at 0.5-2 req/s; files packed into one
# archive (the device returns at most 8 files).
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
RATES=10,20,40,80,inf PROMPTS=300 HF_PROMPTS=16 timeout 400 bash scripts/loadtest_h200.sh $OUT/lt > $OUT/lt.log 2>&1
grep -h "=== \|Output token throughput\|Median TTFT\|Median TPOT\|Successful\|Failed" $OUT/lt/*.txt | head -60
(cd $OUT && tar czf lt.tgz lt && rm -rf lt)
