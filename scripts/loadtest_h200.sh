#!/usr/bin/env bash
# Issue 7 on the GPU host: a request-rate sweep to saturation against `streampage serve`, then the
# same workload against HF `transformers serve --continuous-batching` through the OpenAI backend, on
# one real safetensors checkpoint with seeded random weights. Usage: scripts/loadtest_h200.sh OUT_DIR
# Needs the wheels of .whl/hfserve (scripts/fetch_hfserve_wheels.sh: fastapi, uvicorn, openai, accelerate...) for
# the HF server. HF's completions endpoint takes text only and refuses `ignore_eos`: its prompts go as
# decoded text and its outputs end at max_tokens or at EOS (rare with random weights).
set -u
OUT_DIR=${1:-/tmp/loadtest}; mkdir -p "$OUT_DIR"
SHAPE=${SHAPE:-llama3.2-1b}; CKPT=/tmp/ckpt-$SHAPE
RATES=${RATES:-10,20,40,60,80,120,inf}; PROMPTS=${PROMPTS:-400}
HF_RATES=${HF_RATES:-0.5,1,2}; HF_PROMPTS=${HF_PROMPTS:-24}
WORKLOAD=(${WORKLOAD:---workload sharegpt} --seed 0 --vocab-limit 1000)
# SERVE_OPTS: extra `streampage serve` options (e.g. --mixed-graph-max-tokens 512); SKIP_HF=1: streampage only.
python3 scripts/hf_checkpoint.py $SHAPE $CKPT
python3 -m streampage.cli serve $CKPT --port 8765 ${SERVE_OPTS:-} > "$OUT_DIR/streampage_server.log" 2>&1 &
SERVER=$!
python3 scripts/wait_ready.py http://127.0.0.1:8765/readyz
python3 -m loadtest --port 8765 "${WORKLOAD[@]}" --token-salt 1000 --num-prompts 64 --max-concurrency 64 --no-progress > /dev/null 2>&1
python3 -m loadtest --port 8765 "${WORKLOAD[@]}" --request-rate $RATES --num-prompts $PROMPTS --connections 8 \
    --goodput ttft:500 tpot:50 --no-progress --output "$OUT_DIR/streampage.json" --plot-dir "$OUT_DIR/plots" \
    > "$OUT_DIR/streampage.txt" 2>&1
kill -TERM $SERVER; wait $SERVER
[ -n "${SKIP_HF:-}" ] && exit 0
python3 -m pip install -q --no-index --no-deps --target /tmp/hfsite .whl/hfserve/*.whl
PYTHONPATH=$PYTHONPATH:/tmp/hfsite python3 -m transformers.cli.transformers serve --continuous-batching \
    --port 8000 --dtype bfloat16 --log-level warning > "$OUT_DIR/hf_server.log" 2>&1 &
HF=$!
python3 scripts/wait_ready.py http://127.0.0.1:8000/health
python3 -m loadtest --backend openai --port 8000 --model $CKPT --prompt-tokenizer $CKPT --no-ignore-eos "${WORKLOAD[@]}" --token-salt 1000 --num-prompts 1 \
    --max-concurrency 1 --no-progress > /dev/null 2>&1   # loads the model, warms up
python3 -m loadtest --backend openai --port 8000 --model $CKPT --prompt-tokenizer $CKPT --no-ignore-eos "${WORKLOAD[@]}" \
    --request-rate $HF_RATES --num-prompts $HF_PROMPTS --goodput ttft:500 tpot:50 --request-timeout 300 \
    --no-progress --output "$OUT_DIR/hf.json" --plot-dir "$OUT_DIR/plots_hf" > "$OUT_DIR/hf.txt" 2>&1
kill -TERM $HF; wait $HF || true  # ends by our SIGTERM
