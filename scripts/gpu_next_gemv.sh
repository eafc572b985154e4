#!/usr/bin/env bash
# The next GPU session's second call: the skinny GEMV's GPU tests (split-K hand-off under graph
# replay first), then its sweep against cuBLAS at the 1B and 8B projection shapes, 1-8 rows.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 150 python3 -m pytest -m gpu tests/test_gemv.py -q -x -k "graph_replay or model_shapes" > $OUT/gemv_tests.log 2>&1
tail -5 $OUT/gemv_tests.log
timeout 420 python3 -m streampage.cli bench kernels --gemv --output $OUT/gemv.json > $OUT/gemv.log 2>&1
tail -70 $OUT/gemv.log
