#!/usr/bin/env bash
# Runs the test suite on the TensorFlow, JAX and PyTorch backends.
#   scripts/test.sh           default suite (what CI runs)
#   scripts/test.sh --slow    only the tests marked slow
# Extra arguments go to pytest. Set KVLM_BACKENDS="tensorflow jax" to pick backends, and
# KVLM_TEST_WORKERS to the number of pytest processes (default: one per core, at most 4; each test
# file runs in one process, so its module fixtures are built once; files marked `long` start first).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
marker=(-m "not slow")
if [ "${1:-}" = "--slow" ]; then
  marker=(-m slow)
  shift
fi
paths=(tests)
for p in plugins/*/tests; do [ -d "$p" ] && paths+=("$p"); done
status=0
for backend in ${KVLM_BACKENDS:-tensorflow jax torch}; do
  echo "=== KERAS_BACKEND=$backend ==="
  set +e
  KERAS_BACKEND=$backend python -m pytest "${paths[@]}" "${marker[@]}" -q -rs \
    -n "${KVLM_TEST_WORKERS:-auto}" --maxprocesses 4 --dist loadfile --no-loadscope-reorder "$@"
  rc=$?
  set -e
  # 5 = no tests collected for this selection on this backend: not a failure.
  if [ "$rc" != 0 ] && [ "$rc" != 5 ]; then status=$rc; fi
done
exit "$status"
