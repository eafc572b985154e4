#!/usr/bin/env bash
# Session 2, call 6: the issue-7 sweep (streampage, then HF transformers serve) with its files packed.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
RATES=30,inf PROMPTS=120 HF_RATES=1 HF_PROMPTS=6 timeout 118 bash scripts/loadtest_h200.sh $OUT/lt > $OUT/lt.log 2>&1
grep -h "=== \|Output token throughput\|Median TTFT\|Median TPOT\|Successful\|Failed" $OUT/lt/*.txt | head -30
tail -3 $OUT/lt/hf_server.log
cd $OUT && tar czf lt.tgz lt && rm -rf lt
