#!/usr/bin/env bash
# Delivered tokens/s over WebSocket at 256 concurrent streams vs the engine's offline tokens/s on the
# same workload (the serving bar). Usage: scripts/serving_bench.sh MODEL_OR_SHAPE OUT_DIR
set -u
MODEL=${1:-qwen3-0.6b}; OUT_DIR=${2:-/tmp/serving}; mkdir -p "$OUT_DIR"
PROMPTS=384; CONC=256; IN=512; OUTLEN=256; PORT=8765
DIR=$(python3 -c "from streampage.bench.workloads import resolve_model; print(resolve_model('$MODEL'))")
python3 -m streampage.cli serve "$DIR" --port $PORT --max-queued-requests 2048 --max-requests-per-connection 1024 \
    --max-queued-prompt-tokens 10000000 > "$OUT_DIR/server.log" 2>&1 &
SERVER=$!
python3 scripts/wait_ready.py http://127.0.0.1:$PORT/readyz 120
python3 -m loadtest --port $PORT --num-prompts 64 --max-concurrency 64 --input-len $IN --output-len 32 --token-salt 1000 \
    --vocab-limit 1000 --no-progress > /dev/null 2>&1   # warm-up: compiles every kernel variant
python3 -m loadtest --port $PORT --num-prompts $PROMPTS --max-concurrency $CONC --input-len $IN --output-len $OUTLEN \
    --vocab-limit 1000 --connections 8 --no-progress --output "$OUT_DIR/serving.json" 2>&1 | tail -25
kill -TERM $SERVER; wait $SERVER
python3 -m streampage.cli bench throughput --model "$MODEL" --workload fixed --num-prompts $PROMPTS \
    --input-len $IN --output-len $OUTLEN --output "$OUT_DIR/offline.json" 2>&1 | grep -v "oading weights\|capturing" | tail -4
python3 - "$OUT_DIR" <<'PY'
import json, sys
d = sys.argv[1]
serving = json.load(open(f"{d}/serving.json"))
offline = json.load(open(f"{d}/offline.json"))["results"][0]["output_tok_s"]
delivered = serving["runs"][0]["summary"]["output_throughput"]
print(f"delivered over WebSocket: {delivered:.0f} tok/s; offline engine: {offline:.0f} tok/s; "
      f"ratio {delivered / offline:.3f} (bar >= 0.95)")
PY
