#!/usr/bin/env bash
# The main job end to end on the embedded defaults: procedural data -> train the tiny VLM
# -> evaluate it on a held-out split -> export a TF Serving SavedModel -> serve it over
# gRPC -> ask it questions about images it never saw -> stop the server.
# Extra arguments go to `kvlm train` (e.g. --epochs 2 --train-size 4000 for a quick look).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
RUN="${KVLM_RUN_DIR:-runs/main}"
MODELS="${KVLM_MODEL_BASE:-saved_models}"
export KERAS_BACKEND="${KERAS_BACKEND:-tensorflow}"

kvlm train --output "$RUN" "$@"
kvlm evaluate --model "$RUN"
kvlm export --model "$RUN" --base-path "$MODELS" --name kvlm
kvlm data --output "$RUN/queries" --size 8 --seed 424242

PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
kvlm serve --port "$PORT" --model_name kvlm --model_base_path "$MODELS/kvlm" --enable_batching \
  > "$RUN/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT
echo "serving $MODELS/kvlm on 127.0.0.1:$PORT (log: $RUN/server.log)"
kvlm predict --server "127.0.0.1:$PORT" --model_name kvlm --data "$RUN/queries" --limit 8 --wait 180
kill -TERM "$SERVER"
wait "$SERVER" && echo "server stopped cleanly"
trap - EXIT
