#!/usr/bin/env bash
# Why the decode GEMV ran slower inside the model than in `bench kernels --gemv` (session 4): kernel
# timelines of a batch-1 step (duration and launch gap of each kernel) with cuBLAS, the GEMV, and the
# GEMV with PDL, then batch-1 latency with PDL alone. About 4 minutes.
set -u
mkdir -p $OUT/diag
. scripts/gpu_setup.sh > $OUT/diag/setup.log 2>&1
profile() {  # model, label, options...
  local model=$1 label=$2; shift 2
  timeout 120 python3 scripts/profile_decode.py $model 1 --timeline 22 "$@" > $OUT/diag/profile_${model}_$label.log 2>&1
  echo "== $model $label"; grep -A23 "^kernel  " $OUT/diag/profile_${model}_$label.log | cut -c1-40,64-
  grep "=== batch" $OUT/diag/profile_${model}_$label.log
}
profile llama3.2-1b cublas
profile llama3.2-1b gemv --decode-gemv
profile llama3.2-1b gemv_pdl --decode-gemv --programmatic-launch
profile llama3-8b gemv_pdl --decode-gemv --programmatic-launch
for model in llama3.2-1b llama3-8b; do
  timeout 100 python3 -m streampage.cli bench latency --model $model --batch-sizes 1 --programmatic-launch \
      --output $OUT/diag/latency_${model}_pdl.json > $OUT/diag/latency_${model}_pdl.log 2>&1
  echo "== $model pdl"; grep -A2 "weight-read floor" $OUT/diag/latency_${model}_pdl.log
done
(cd $OUT && tar czf diag.tgz diag && rm -rf diag)
