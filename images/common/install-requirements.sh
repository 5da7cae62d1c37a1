#!/bin/sh
# pip-installs a requirement file into /opt/venv: wheels from the wheelhouse first, then the
# package index (and the variant's extra index) unless PIP_OFFLINE=1 (air-gapped builds). A
# lock (*.lock: every package pinned with its hashes) is installed hash-checked, so a wheel
# that is not the one locked fails the build. pip trusts the system store, extra CA
# certificates included. A build-constraints.txt beside the requirement file pins what
# source builds need (Chainer's setup.py: an old setuptools).
#   install-requirements.sh REQUIREMENTS WHEELHOUSE
set -eu
requirements="$1"
wheelhouse="$2"
constraints="$(dirname "$requirements")/build-constraints.txt"
if [ -f "$constraints" ]; then
  # pip < 25.3 applies PIP_CONSTRAINT to the isolated builds of source packages too.
  export PIP_CONSTRAINT="$constraints"
fi
set --
if [ "${PIP_OFFLINE:-0}" = 1 ]; then
  set -- "$@" --no-index
fi
case "$requirements" in
  *.lock) set -- "$@" --require-hashes ;;
esac
/opt/venv/bin/python -m pip install --no-cache-dir --disable-pip-version-check \
  --cert /etc/ssl/certs/ca-certificates.crt --find-links "$wheelhouse" "$@" -r "$requirements"
