#!/usr/bin/env bash
# docker-compose.yml's services, through `docker compose` (v2) where the engine has that plugin,
# else `docker-compose` (v1.28 or later: Debian's package), with the values the file reads from
# the environment: the bench's code hash (the images' org.dlbench.bench-hash label, as the
# harness's builds set it) and the host user, whom the containers run as.
#   scripts/compose.sh build pytorch
#   scripts/compose.sh run --rm pytorch python -m bench --framework pytorch --task cnn_cifar10 --synthetic \
#     --out /dlbench/out/cnn_cifar10-pytorch.json
set -euo pipefail
cd "$(dirname "$0")/.."
DLBENCH_BENCH_HASH="$(python3 -c 'from bench.result import bench_code_hash; print(bench_code_hash())')"
export DLBENCH_BENCH_HASH DLBENCH_UID="${DLBENCH_UID:-$(id -u)}" DLBENCH_GID="${DLBENCH_GID:-$(id -g)}"
mkdir -p results/compose  # before the engine makes it, as root, unwritable by the cells
if docker compose version >/dev/null 2>&1; then
  exec docker compose "$@"
fi
exec docker-compose "$@"
