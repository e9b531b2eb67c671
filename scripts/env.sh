#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in .venv and activates it.
# Sourced by the other scripts; safe to run on a fresh machine.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.kvlm-installed"
needs_install=0
[ -x "$VENV/bin/python" ] || needs_install=1
[ -f "$STAMP" ] || needs_install=1
if [ "$needs_install" = 0 ]; then
  for f in "$ROOT/pyproject.toml" "$ROOT"/plugins/*/pyproject.toml; do
    [ -f "$f" ] && [ "$f" -nt "$STAMP" ] && needs_install=1
  done
fi
if [ "$needs_install" = 1 ]; then
  echo "kvlm: setting up $VENV" >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  args=(-e "$ROOT[jax,torch,dev]")
  for p in "$ROOT"/plugins/*/; do
    [ -f "$p/pyproject.toml" ] && args+=(-e "$p")
  done
  "$VENV/bin/python" -m pip install --quiet --no-compile "${args[@]}"
  # Bytecode for the installed packages, compiled on all cores (pip would compile one file at a time):
  # where PYTHONDONTWRITEBYTECODE is set, nothing else writes it, and each process that imports
  # TensorFlow would compile it again (18 s instead of 7). The packages' own test folders are left
  # out (a quarter of the files); a few files elsewhere are written for newer Pythons and do not
  # compile, which pip ignores too.
  "$VENV/bin/python" -m compileall -qq -j 0 -x '/tests?/' \
    "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" || true
  touch "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
