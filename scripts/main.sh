#!/usr/bin/env bash
# The main job end to end on the embedded defaults: procedural data -> train the tiny VLM
# -> evaluate it on a held-out split -> export a TF Serving SavedModel; then install the
# plugins' trained domain experts into the shipped base (no training step) and export it
# too -> serve both over gRPC -> ask them about images they never saw (the experts model:
# the general task and every domain) -> stop the server.
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

kvlm experts install --output "$RUN/experts"
kvlm export --model "$RUN/experts" --base-path "$MODELS" --name kvlm_experts
DATASETS=(shapes legal_documents medical_scans retail_shelves)
for dataset in "${DATASETS[@]}"; do
  kvlm data --dataset "$dataset" --output "$RUN/queries_experts/$dataset" --size 4 --seed 424242 > /dev/null
done

MODELS_ABS="$(cd "$MODELS" && pwd)"
cat > "$RUN/models.config" <<CONFIG
model_config_list {
  config { name: "kvlm" base_path: "$MODELS_ABS/kvlm" model_platform: "tensorflow" }
  config { name: "kvlm_experts" base_path: "$MODELS_ABS/kvlm_experts" model_platform: "tensorflow" }
}
CONFIG
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
kvlm serve --port "$PORT" --model_config_file "$RUN/models.config" --enable_batching > "$RUN/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null || true' EXIT
echo "serving $MODELS/kvlm and $MODELS/kvlm_experts on 127.0.0.1:$PORT (log: $RUN/server.log)"
kvlm predict --server "127.0.0.1:$PORT" --model_name kvlm --data "$RUN/queries" --limit 8 --wait 180
for dataset in "${DATASETS[@]}"; do
  echo "kvlm_experts on $dataset:"
  kvlm predict --server "127.0.0.1:$PORT" --model_name kvlm_experts --data "$RUN/queries_experts/$dataset" \
    --limit 4 --wait 180
done
kill -TERM "$SERVER"
wait "$SERVER" && echo "server stopped cleanly"
trap - EXIT
