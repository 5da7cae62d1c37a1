#!/usr/bin/env bash
# Make a Debian base image without a registry: debootstrap a minimal bookworm (with Python, venv
# and CA certificates, so image builds need no apt step) and `docker import` it. Uses the Debian
# mirror apt is configured with. Does nothing when the image exists.
#   scripts/make-base-image.sh [TAG]        (default dlbench/debian:bookworm; needs DOCKER_HOST)
set -euo pipefail
TAG="${1:-dlbench/debian:bookworm}"
if docker image inspect "$TAG" >/dev/null 2>&1; then
  echo "$TAG exists" >&2
  exit 0
fi
mirror="$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)"
mirror="${mirror:-$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}"
mirror="${mirror:-http://deb.debian.org/debian}"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm from $mirror" >&2
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >&2
tar -C "$root" -c . | docker import --change 'CMD ["/bin/bash"]' - "$TAG" >&2
echo "made $TAG" >&2
