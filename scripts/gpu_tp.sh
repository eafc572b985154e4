#!/usr/bin/env bash
# Issue 9 on nvidia-h200-x2: the two-GPU tensor-parallel tests, then batch-1..256 latency and the
# nano-vllm workload at TP=1 and TP=2 on the Llama-3-8B shape in the same call, each bench started only
# if it can finish before the call's limit. Logs are packed into one archive (the device returns at most
# 8 files).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # the host's rule
START=$SECONDS
LIMIT=${LIMIT:-590}
mkdir -p $OUT/tp
. scripts/gpu_setup.sh > $OUT/tp/setup.log 2>&1
nvidia-smi topo -m >> $OUT/tp/setup.log 2>&1
timeout 220 python3 -m pytest -v -m gpu -o faulthandler_timeout=90 -rs --durations=0 tests/test_tensor_parallel.py 2>&1 \
    | grep -v "nanobind\|leaked\|refleaks" > $OUT/tp/gpu_tests.log
grep -E "PASS|FAIL|ERROR|Timeout|passed|failed|s call" $OUT/tp/gpu_tests.log
echo "tests done at $((SECONDS - START)) s"
python3 -c "from streampage.bench.workloads import resolve_model; resolve_model('llama3-8b')"
bench() {  # bench NAME BUDGET ARGS...: run `streampage bench` if BUDGET seconds are left
  local name=$1 budget=$2; shift 2
  if (( LIMIT - (SECONDS - START) < budget )); then echo "skipped $name: no time left"; return; fi
  timeout $budget python3 -m streampage.cli bench "$@" --output $OUT/tp/$name.json > $OUT/tp/$name.log 2>&1
  echo "== $name ($((SECONDS - START)) s)"; grep -v "INFO\|Warning\|warn" $OUT/tp/$name.log | tail -6
}
for tp in 1 2; do bench latency_tp$tp 100 latency --model llama3-8b --tensor-parallel-size $tp --batch-sizes 1,32,256; done
for tp in 1 2; do bench throughput_tp$tp 90 throughput --model llama3-8b --tensor-parallel-size $tp; done
(cd $OUT && tar czf tp.tgz tp && rm -rf tp)
