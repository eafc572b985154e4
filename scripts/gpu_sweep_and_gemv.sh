#!/usr/bin/env bash
# One call on nvidia-h200: the issue-7 rate sweep against streampage and HF `transformers serve`
# (files packed into one archive), then the skinny GEMV's GPU tests and its sweep against cuBLAS.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
RATES=10,20,40,80,inf PROMPTS=300 HF_PROMPTS=16 timeout 330 bash scripts/loadtest_h200.sh $OUT/lt > $OUT/lt.log 2>&1
grep -h "=== \|Output token throughput\|Median TTFT\|Median TPOT\|Successful\|Failed" $OUT/lt/*.txt | head -60
(cd $OUT && tar czf lt.tgz lt && rm -rf lt)
timeout 90 python3 -m pytest -m gpu tests/test_gemv.py -q -x -k "graph_replay or model_shapes" > $OUT/gemv_tests.log 2>&1
tail -3 $OUT/gemv_tests.log
timeout 150 python3 -m streampage.cli bench kernels --gemv --reps 7 --output $OUT/gemv.json > $OUT/gemv.log 2>&1
tail -40 $OUT/gemv.log
