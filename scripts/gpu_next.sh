#!/usr/bin/env bash
# Session 2, call 3: mixed-length decode split probe + cuBLAS GEMV efficiency, the kernel bench with
# the prefill config sweep, and whether HF `transformers serve` can run here from carried wheels.
set -u
. scripts/gpu_setup.sh > $OUT/setup.log 2>&1
timeout 120 python3 scripts/probe_decode_gemm.py > $OUT/probe.log 2>&1; cat $OUT/probe.log
( python3 -m pip install -q --no-index --no-deps --target /tmp/hfsite .whl/hfserve/*.whl
  export PYTHONPATH=$PYTHONPATH:/tmp/hfsite
  python3 -c "import aiohttp; print('aiohttp', aiohttp.__version__)"
  python3 -c "import fastapi, uvicorn, openai, pydantic; print('serve deps import')"
  T=$(python3 -c "import transformers,os;print(os.path.dirname(transformers.__file__))")
  ls $T/cli $T/cli/serving $T/commands 2>/dev/null | tr '\n' ' '; echo
  grep -rn '@app.post\|add_api_route\|"/v1' $T/cli $T/commands 2>/dev/null | head
  grep -rn 'prompt.*must\|isinstance(prompt' $T/cli $T/commands 2>/dev/null | head -5
  timeout 60 python3 -m transformers.cli.transformers serve --help 2>&1 | tail -40
) > $OUT/hfserve_probe.log 2>&1
timeout 330 python3 -m streampage.cli bench kernels --no-flex --prefill-sweep --output $OUT/kernels.json > $OUT/kernels.log 2>&1
tail -45 $OUT/kernels.log
