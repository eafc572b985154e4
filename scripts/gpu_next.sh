#!/usr/bin/env bash
# Session 2, call 4: balanced decode splits: kernel + engine GPU tests, the mixed-length probe, throughput.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 150 python3 -m pytest -q -x tests/test_kernels.py tests/test_gpu_engine.py > $OUT/tests.log 2>&1
tail -1 $OUT/tests.log
timeout 90 python3 scripts/probe_decode_gemm.py --no-gemm > $OUT/probe.log 2>&1; cat $OUT/probe.log
timeout 60 python3 -m streampage.cli bench throughput --model qwen3-0.6b > $OUT/throughput.log 2>&1
grep -v "oading weights\|capturing" $OUT/throughput.log | tail -2
