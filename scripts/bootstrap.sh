# Sourced by run.sh and test.sh: creates .venv (the harness's own environment) from the
# pinned requirement file given as $1, and reinstalls only when that file changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
requirements="$ROOT/$1"
venv="$ROOT/.venv"
stamp="$venv/.installed-$(basename "$requirements")"
want="$(cat "$ROOT/harness/requirements.txt" "$requirements" | sha256sum | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ]; then
  "$PYTHON" -m venv "$venv"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  echo "$want" > "$stamp"
fi
