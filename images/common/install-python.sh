#!/bin/sh
# The image's Python: the base's own python<version> (installed from the base's packages when it
# lacks it, with any system packages the framework needs), the extra CA certificates of
# images/ca-certificates/ registered in the system store, and a virtual environment in /opt/venv.
#   install-python.sh VERSION [DEBIAN-PACKAGE...]
set -eu
version="$1"
shift
if [ $# -gt 0 ] || ! "python$version" -c "import ensurepip, venv" >/dev/null 2>&1; then
  apt-get update
  apt-get install -y --no-install-recommends "python$version" "python$version-venv" ca-certificates "$@"
  rm -rf /var/lib/apt/lists/*
fi
update-ca-certificates
"python$version" -m venv /opt/venv
