#!/usr/bin/env bash
# A private Docker engine for the docker backend and its tests: Debian's docker.io, rootful,
# with its own socket, data folder and pid file, touching no host networking (no bridge, no
# iptables: containers get --network none or host), and beside it a private registry on
# 127.0.0.1:5000 (Debian's docker-registry), where a base image made without a registry gets a
# digest to be pinned by, as an air-gapped site's mirror gives one. Installs both when missing.
#   eval "$(scripts/docker-engine.sh start)"   # starts them (or finds them running), exports
#                                              # DOCKER_HOST and DLBENCH_REGISTRY
#   scripts/docker-engine.sh stop              # stops them by their pids
set -euo pipefail
STATE="${DLBENCH_DOCKER_STATE:-/var/lib/dlbench-docker}"
SOCKET="$STATE/run/docker.sock"
PIDFILE="$STATE/run/dockerd.pid"
REGISTRY_ADDRESS="127.0.0.1:5000"
REGISTRY_PIDFILE="$STATE/run/registry.pid"

install_engine() {
  command -v dockerd >/dev/null && command -v debootstrap >/dev/null && command -v docker-compose >/dev/null \
    && command -v docker-registry >/dev/null && return
  echo "installing Debian's docker.io, docker-compose, docker-registry and debootstrap (log: $STATE/install.log)" >&2
  mkdir -p "$STATE"
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      docker.io docker-compose docker-registry debootstrap; } >"$STATE/install.log" 2>&1 || {
    echo "error: installing the engine failed; see $STATE/install.log" >&2; tail -5 "$STATE/install.log" >&2; exit 1; }
}

running() {
  [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

registry_answers() {
  python3 -c "import urllib.request; urllib.request.urlopen('http://$REGISTRY_ADDRESS/v2/', timeout=2)" 2>/dev/null
}

start_registry() {
  mkdir -p "$STATE/registry"
  if ! running "$REGISTRY_PIDFILE"; then
    printf 'version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
      "$STATE/registry" "$REGISTRY_ADDRESS" >"$STATE/registry.yml"
    /usr/bin/docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 &
    echo $! >"$REGISTRY_PIDFILE"
    for _ in $(seq 50); do
      registry_answers && break
      sleep 0.2
    done
    registry_answers || {
      echo "error: the registry did not answer on $REGISTRY_ADDRESS; see $STATE/registry.log" >&2
      tail -5 "$STATE/registry.log" >&2; exit 1; }
  fi
  echo "export DLBENCH_REGISTRY=$REGISTRY_ADDRESS"
}

start() {
  install_engine
  mkdir -p "$STATE/run" "$STATE/data" "$STATE/exec"
  if ! running "$PIDFILE"; then
    rm -f "$SOCKET" "$PIDFILE"  # left by an engine that was killed
    /usr/sbin/dockerd --host "unix://$SOCKET" --pidfile "$PIDFILE" --data-root "$STATE/data" \
      --exec-root "$STATE/exec" --storage-driver overlay2 --iptables=false --ip-masq=false \
      --bridge=none >"$STATE/dockerd.log" 2>&1 &
    for _ in $(seq 100); do
      DOCKER_HOST="unix://$SOCKET" /usr/bin/docker version >/dev/null 2>&1 && break
      sleep 0.2
    done
    DOCKER_HOST="unix://$SOCKET" /usr/bin/docker version >/dev/null 2>&1 || {
      echo "error: dockerd did not answer on $SOCKET; see $STATE/dockerd.log" >&2; tail -5 "$STATE/dockerd.log" >&2; exit 1; }
  fi
  echo "export DOCKER_HOST=unix://$SOCKET"
  start_registry
}

stop_by() {
  running "$1" || return 0
  local pid
  pid="$(cat "$1")"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  stop_by "$REGISTRY_PIDFILE"
  stop_by "$PIDFILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
