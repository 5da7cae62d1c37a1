#!/bin/sh
# pip-installs a pinned requirement file into /opt/venv: wheels from the wheelhouse first, then
# the package index (and the variant's extra index) unless PIP_OFFLINE=1 (air-gapped builds).
# pip trusts the system store, extra CA certificates included.
#   install-requirements.sh REQUIREMENTS WHEELHOUSE [BUILD-CONSTRAINTS]
set -eu
requirements="$1"
wheelhouse="$2"
if [ $# -gt 2 ]; then
  # Pins for source builds (Chainer's setup.py): pip < 25.3 applies PIP_CONSTRAINT to them.
  export PIP_CONSTRAINT="$3"
fi
if [ "${PIP_OFFLINE:-0}" = 1 ]; then
  set -- --no-index
else
  set --
fi
/opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
  --cert /etc/ssl/certs/ca-certificates.crt --find-links "$wheelhouse" "$@" -r "$requirements"
