#!/usr/bin/env bash
# Locate the device-side assert: blocking launches on the failing run, and the same run without async scheduling.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
CUDA_LAUNCH_BLOCKING=1 timeout 120 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1 --output-len 16 > $OUT/blocking.log 2>&1
grep -v "Assertion\|oading\|capturing" $OUT/blocking.log | grep -B30 "Error" | grep "File\|Error\|^    " | head -40
timeout 120 python3 -m streampage.cli bench latency --model llama3.2-1b --batch-sizes 1,64 --output-len 32 --no-async-scheduling > $OUT/sync.log 2>&1
grep -v "oading weights\|capturing" $OUT/sync.log | tail -5
