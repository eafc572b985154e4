#!/usr/bin/env bash
# Batch-1 decode with the split-K GEMV prefetching its weight into L2 before its PDL wait
# (STREAMPAGE_GEMV_L2_PREFETCH = share of L2 per launch) and the small kernels letting the next one
# launch before their own wait (STREAMPAGE_PDL_TRIGGER_FIRST=1): the GPU tests of the kernels with
# both on, then batch 1 and 4 latency across routings and switches, then 1B / 8B timelines.
# Logs go into one archive; the summary is printed last.
set -u
mkdir -p $OUT/l2
S=$OUT/summary.txt
. scripts/gpu_setup.sh > $OUT/l2/setup.log 2>&1
t0=$(date +%s)
STREAMPAGE_PDL_TRIGGER_FIRST=1 STREAMPAGE_GEMV_L2_PREFETCH=0.3 timeout 150 python3 -m pytest -q -m gpu \
    tests/test_gemv.py tests/test_fused_ops.py > $OUT/l2/gpu_tests.log 2>&1
echo "gpu tests (prefetch 0.3, trigger first): $(tail -1 $OUT/l2/gpu_tests.log) [$(( $(date +%s) - t0 )) s]" | tee -a $S

lat() {  # lat MODEL GEMV PREFETCH TRIGGER_FIRST; skipped once the call has run 8 minutes
  if (( $(date +%s) - t0 > 480 )); then echo "skipped $*" | tee -a $S; return; fi
  local name=$1_$2_p$3_t$4; name=${name//,/+}
  local t=$(date +%s)
  STREAMPAGE_GEMV_L2_PREFETCH=$3 STREAMPAGE_PDL_TRIGGER_FIRST=$4 timeout 90 python3 -m streampage.cli bench latency \
      --model $1 --batch-sizes 1,4 --decode-gemv $2 --output $OUT/l2/lat_$name.json > $OUT/l2/lat_$name.log 2>&1
  { echo "== $1 gemv=$2 prefetch=$3 trigger_first=$4 [$(( $(date +%s) - t )) s]"; grep -A2 "^ batch" $OUT/l2/lat_$name.log; } | tee -a $S
}
lat llama3.2-1b off 0 0
lat llama3.2-1b all 0.3 1
lat llama3-8b off 0 0
lat llama3-8b all 0.3 1
lat llama3.2-1b all 0 0
lat llama3.2-1b all 0 1
lat llama3.2-1b all 0.3 0
lat llama3.2-1b qkv,o,down 0.3 1
lat llama3-8b o,down 0.3 1
lat llama3.2-1b all 0.6 1
lat llama3-8b all 0 1
for m in llama3.2-1b llama3-8b; do
  (( $(date +%s) - t0 > 500 )) && break
  STREAMPAGE_GEMV_L2_PREFETCH=0.3 STREAMPAGE_PDL_TRIGGER_FIRST=1 timeout 90 python3 scripts/profile_decode.py $m 1 \
      --timeline 22 --decode-gemv all > $OUT/l2/profile_${m}_all.log 2>&1
  { echo "== timeline $m --decode-gemv all, prefetch 0.3, trigger first"; tail -24 $OUT/l2/profile_${m}_all.log; } >> $S
done
(cd $OUT && tar czf l2.tgz l2 && rm -rf l2)
cat $S
