#!/usr/bin/env bash
# A private one-node Slurm cluster for the slurm backend and its tests: Debian's slurm-wlm with
# slurmdbd accounting on a private MariaDB, munge auth, and three fake GPUs (gres gpu:h100:2 and
# gpu:a100:1 backed by character devices). Everything (configs, pid files, logs, spool, state,
# the MariaDB datadir, the device nodes) lives in one state folder; the daemons listen on ports
# 16817-16819 and the MariaDB socket is /run/mysqld/mysqld.sock. Runs as root, needs no systemd,
# and installs its packages when they are missing.
#   eval "$(scripts/slurm-cluster.sh start)"   # starts it (or finds it running), exports SLURM_CONF
#   scripts/slurm-cluster.sh stop              # stops every daemon by its pid file
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"
STATE="${DLBENCH_SLURM_STATE:-/var/lib/dlbench-slurm}"
ETC="$STATE/etc"
RUN="$STATE/run"
LOG="$STATE/log"
CONF="$ETC/slurm.conf"
CLUSTER=dlbench
CTLD_PORT=16817
SLURMD_PORT=16818
DBD_PORT=16819
MUNGE_DIR="$STATE/munge"                 # munged wants a folder of its own, owned by munge
MUNGE_PID="$MUNGE_DIR/munged.pid"
MUNGE_KEY=/etc/munge/munge.key
MYSQL_DIR="$STATE/mysql"
MYSQL_SOCKET=/run/mysqld/mysqld.sock     # where slurmdbd's client library looks for "localhost"
MYSQL_PID="$RUN/mysqld/mariadb.pid"      # mariadbd writes it as mysql, so in a folder mysql owns
DB_PASS_FILE="$STATE/slurmdb.pass"
NODE="$(hostname -s)"

fail() {  # fail MESSAGE LOGFILE
  echo "error: $1; see $2" >&2
  [ -f "$2" ] && tail -5 "$2" >&2
  exit 1
}

install_packages() {
  local cmd missing=
  for cmd in slurmctld slurmd slurmdbd munged mariadbd sbatch; do
    command -v "$cmd" >/dev/null || missing=1
  done
  [ -z "$missing" ] && return
  echo "installing Debian's slurm-wlm, slurmdbd, munge and mariadb-server (log: $STATE/install.log)" >&2
  mkdir -p "$STATE"
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      slurm-wlm slurmdbd munge mariadb-server; } >"$STATE/install.log" 2>&1 ||
    fail "installing the Slurm packages failed" "$STATE/install.log"
}

alive() {  # alive PID NAME: a process called NAME runs as PID (and is not a zombie)
  [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ] && [[ "$(cat "/proc/$1/stat" 2>/dev/null)" =~ \)\ [^Z] ]]
}

pid_of() {  # pid_of NAME PIDFILE: prints the pid when a process called NAME runs under it
  local pid
  [ -f "$2" ] || return 1
  pid="$(cat "$2" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" "$1" || return 1
  echo "$pid"
}

running() {  # running NAME PIDFILE
  pid_of "$1" "$2" >/dev/null
}

wait_for() {  # wait_for SECONDS COMMAND...: retries COMMAND every 0.2 s
  local i
  for ((i = 0; i < $1 * 5; i++)); do
    "${@:2}" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  "${@:2}" >/dev/null 2>&1
}

mysql_client() {
  mariadb --no-defaults --protocol=socket --socket="$MYSQL_SOCKET" -uroot "$@"
}

munge_works() {
  munge -n </dev/null | unmunge >/dev/null
}

write_configs() {
  local hw real_mem dev
  mkdir -p "$ETC" "$STATE/dev"
  for dev in 0 1 2; do
    [ -c "$STATE/dev/nvidia$dev" ] || { rm -f "$STATE/dev/nvidia$dev"; mknod -m 666 "$STATE/dev/nvidia$dev" c 195 "$dev"; }
  done
  [ -s "$DB_PASS_FILE" ] || (umask 077 && od -An -tx1 -N12 /dev/urandom | tr -d ' \n' >"$DB_PASS_FILE")
  # NodeName=... CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1 RealMemory=24105
  hw="$(slurmd -C | head -1)"
  real_mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
  real_mem=$((real_mem > 1024 ? real_mem - 512 : real_mem))
  hw="$(tr ' ' '\n' <<<"$hw" | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')"
  cat >"$CONF" <<EOF
# Written by scripts/slurm-cluster.sh on every start; edits here are lost.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu,gres/gpu:h100,gres/gpu:a100
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
GresTypes=gpu
ReturnToService=2
MinJobAge=600
KillWait=5
NodeName=$NODE NodeAddr=127.0.0.1 ${hw}RealMemory=$real_mem Gres=gpu:h100:2,gpu:a100:1 State=UNKNOWN
PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$ETC/gres.conf" <<EOF
AutoDetect=off
Name=gpu Type=h100 File=$STATE/dev/nvidia0
Name=gpu Type=h100 File=$STATE/dev/nvidia1
Name=gpu Type=a100 File=$STATE/dev/nvidia2
EOF
  (umask 077 && cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$(cat "$DB_PASS_FILE")
EOF
  )
  chmod 0600 "$ETC/slurmdbd.conf"
}

start_munge() {
  if [ ! -s "$MUNGE_KEY" ]; then
    mkdir -p "$(dirname "$MUNGE_KEY")"
    mungekey --create --keyfile="$MUNGE_KEY"
  fi
  chown munge:munge "$(dirname "$MUNGE_KEY")" "$MUNGE_KEY"
  chmod 0700 "$(dirname "$MUNGE_KEY")"
  chmod 0400 "$MUNGE_KEY"
  mkdir -p /run/munge "$MUNGE_DIR"
  chown munge:munge /run/munge "$MUNGE_DIR"
  chmod 0755 /run/munge
  chmod 0700 "$MUNGE_DIR"
  running munged "$MUNGE_PID" && munge_works && return
  rm -f "$MUNGE_PID" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  runuser -u munge -- munged --pid-file="$MUNGE_PID" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$LOG/munged.out" 2>&1 ||
    fail "munged did not start" "$MUNGE_DIR/munged.log"
  wait_for 10 munge_works || fail "munge -n | unmunge does not work" "$MUNGE_DIR/munged.log"
}

start_mariadb() {
  mkdir -p /run/mysqld "$RUN/mysqld"
  chown mysql:mysql /run/mysqld "$RUN/mysqld"
  if [ ! -d "$MYSQL_DIR/mysql" ]; then
    rm -rf "$MYSQL_DIR"
    mkdir -p "$MYSQL_DIR"
    chown mysql:mysql "$MYSQL_DIR"
    mariadb-install-db --no-defaults --user=mysql --datadir="$MYSQL_DIR" --skip-test-db \
      >"$LOG/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed" "$LOG/mariadb-install.log"
  fi
  if ! running mariadbd "$MYSQL_PID"; then
    rm -f "$MYSQL_PID" "$MYSQL_SOCKET" "$MYSQL_SOCKET.lock"
    setsid mariadbd --no-defaults --user=mysql --datadir="$MYSQL_DIR" --skip-networking \
      --socket="$MYSQL_SOCKET" --pid-file="$MYSQL_PID" --innodb-lock-wait-timeout=900 \
      </dev/null >>"$LOG/mariadb.log" 2>&1 &
    wait_for 60 mysql_client -e 'SELECT 1' || fail "mariadbd did not answer on $MYSQL_SOCKET" "$LOG/mariadb.log"
  fi
  mysql_client >>"$LOG/mariadb.log" 2>&1 <<EOF || fail "creating the slurm database user failed" "$LOG/mariadb.log"
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$(cat "$DB_PASS_FILE")';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(cat "$DB_PASS_FILE")';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

dbd_answers() {
  sacctmgr -n -P show cluster format=cluster </dev/null
}

start_slurmdbd() {
  if ! running slurmdbd "$RUN/slurmdbd.pid"; then
    rm -f "$RUN/slurmdbd.pid"
    slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 || fail "slurmdbd did not start" "$LOG/slurmdbd.log"
  fi
  wait_for 60 dbd_answers || fail "slurmdbd did not answer on port $DBD_PORT" "$LOG/slurmdbd.log"
  if ! dbd_answers | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" </dev/null >>"$LOG/sacctmgr.log" 2>&1 ||
      fail "registering cluster $CLUSTER with slurmdbd failed" "$LOG/sacctmgr.log"
  fi
}

node_state() {
  sinfo -h -N -n "$NODE" -o %t </dev/null 2>/dev/null
}

start_slurm() {
  local state i
  if ! running slurmctld "$RUN/slurmctld.pid"; then
    rm -f "$RUN/slurmctld.pid"
    slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1 || fail "slurmctld did not start" "$LOG/slurmctld.log"
  fi
  wait_for 30 scontrol ping || fail "slurmctld did not answer on port $CTLD_PORT" "$LOG/slurmctld.log"
  if ! running slurmd "$RUN/slurmd.pid"; then
    rm -f "$RUN/slurmd.pid"
    slurmd </dev/null >>"$LOG/slurmd.out" 2>&1 || fail "slurmd did not start" "$LOG/slurmd.log"
  fi
  for ((i = 0; i < 150; i++)); do
    state="$(node_state)" || true
    case "$state" in
      idle | mix | alloc) return 0 ;;
      drain* | drng | down | fail*) scontrol update nodename="$NODE" state=resume </dev/null >/dev/null 2>&1 || true ;;
    esac
    sleep 0.2
  done
  fail "node $NODE is not idle (state: ${state:-unknown})" "$LOG/slurmd.log"
}

all_running() {
  running munged "$MUNGE_PID" && running mariadbd "$MYSQL_PID" && running slurmdbd "$RUN/slurmdbd.pid" &&
    running slurmctld "$RUN/slurmctld.pid" && running slurmd "$RUN/slurmd.pid"
}

start() {
  [ "$(id -u)" = 0 ] || { echo "error: $0 must run as root" >&2; exit 1; }
  export SLURM_CONF="$CONF"
  if ! all_running; then
    {  # stdout carries only the export line
      install_packages
      mkdir -p "$RUN" "$LOG" "$STATE/spool/slurmctld" "$STATE/spool/slurmd"
      write_configs
      echo "starting the Slurm cluster $CLUSTER in $STATE"
      start_munge
      start_mariadb
      start_slurmdbd
      start_slurm
    } >&2
  fi
  echo "export SLURM_CONF=$CONF"
}

stop_daemon() {  # stop_daemon NAME PIDFILE
  local pid i
  pid="$(pid_of "$1" "$2")" || return 0
  kill "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    alive "$pid" "$1" || return 0
    sleep 0.2
  done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  stop_daemon slurmd "$RUN/slurmd.pid"
  stop_daemon slurmctld "$RUN/slurmctld.pid"
  stop_daemon slurmdbd "$RUN/slurmdbd.pid"
  stop_daemon mariadbd "$MYSQL_PID"
  stop_daemon munged "$MUNGE_PID"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
