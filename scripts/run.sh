#!/usr/bin/env bash
# Set up the harness and run a matrix (default: the repository's matrix.yml).
#   scripts/run.sh [matrix.yml] [run_matrix.py options...]
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh" harness/requirements.txt
cd "$ROOT"
if [ $# -eq 0 ] || [[ "$1" == -* ]]; then
  set -- matrix.yml "$@"
fi
exec "$ROOT/.venv/bin/python" harness/run_matrix.py "$@"
