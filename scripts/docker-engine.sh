#!/usr/bin/env bash
# A private Docker engine for the docker backend and its tests: Debian's docker.io, rootful,
# with its own socket, data folder and pid file, touching no host networking (no bridge, no
# iptables: containers get --network none or host). Installs the engine when it is missing.
#   eval "$(scripts/docker-engine.sh start)"   # starts it (or finds it running), exports DOCKER_HOST
#   scripts/docker-engine.sh stop              # stops it by its pid
set -euo pipefail
STATE="${DLBENCH_DOCKER_STATE:-/var/lib/dlbench-docker}"
SOCKET="$STATE/run/docker.sock"
PIDFILE="$STATE/run/dockerd.pid"

install_engine() {
  command -v dockerd >/dev/null && command -v debootstrap >/dev/null && command -v docker-compose >/dev/null && return
  echo "installing Debian's docker.io, docker-compose and debootstrap (log: $STATE/install.log)" >&2
  mkdir -p "$STATE"
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      docker.io docker-compose debootstrap; } >"$STATE/install.log" 2>&1 || {
    echo "error: installing the engine failed; see $STATE/install.log" >&2; tail -5 "$STATE/install.log" >&2; exit 1; }
}

running() {
  [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null
}

start() {
  install_engine
  mkdir -p "$STATE/run" "$STATE/data" "$STATE/exec"
  if ! running; then
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
}

stop() {
  running || return 0
  local pid
  pid="$(cat "$PIDFILE")"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -9 "$pid" 2>/dev/null || true
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
