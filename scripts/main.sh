#!/usr/bin/env bash
# The main job end to end on the embedded defaults: procedural data -> train the tiny VLM
# -> evaluate it on a held-out split.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
RUN="${KVLM_RUN_DIR:-runs/main}"
export KERAS_BACKEND="${KERAS_BACKEND:-tensorflow}"
kvlm train --output "$RUN" "$@"
kvlm evaluate --model "$RUN"
