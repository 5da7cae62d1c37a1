#!/usr/bin/env bash
# Set up the harness with its test tools and run the test suite (pytest options pass through).
# The integration tests build the PyTorch and TensorFlow environments on first use (cached).
set -euo pipefail
source "$(dirname "$0")/bootstrap.sh" harness/requirements-test.txt
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest "$@"
