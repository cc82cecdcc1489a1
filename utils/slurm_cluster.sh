#!/usr/bin/env bash
# Bring up (or stop) a private single-node Slurm cluster in DIR, for tests and small machines.
#   utils/slurm_cluster.sh start DIR    # prints the line to eval: export SLURM_CONF=DIR/slurm.conf
#   utils/slurm_cluster.sh stop DIR     # cancels its jobs, stops its daemons by PID
# Everything (munge key, slurm.conf, spool, logs, PID files) lives under DIR, but for munge's
# socket: munged wants every directory above it open to all, so it goes to a fresh
# /tmp/comflp-munge.XXXXXX (removed by stop). The export line is also written to DIR/env.sh. No systemd is needed: munged, slurmctld and slurmd run as
# daemons of the current user, on free ports, so several clusters can run side by side.
# Debian's slurmctld, slurmd, slurm-client and munge packages are installed with apt-get when
# missing and running as root; otherwise the script stops and says what to install.
set -euo pipefail

usage() {
  echo "usage: $0 start DIR | stop DIR" >&2
  exit 1
}
die() {
  echo "slurm_cluster.sh: ERROR: $*" >&2
  exit 1
}
[ $# -eq 2 ] || usage
action=$1
case $action in start | stop) ;; *) usage ;; esac
if [ "$action" = stop ] && [ ! -d "$2" ]; then
  echo "slurm_cluster.sh: $2 does not exist: no cluster to stop" >&2
  exit 0
fi
mkdir -p "$2"
dir=$(cd "$2" && pwd)
export SLURM_CONF=$dir/slurm.conf

# The packages providing each program the cluster needs.
ensure_packages() {
  local missing=() program
  declare -A package=(
    [munged]=munge [slurmctld]=slurmctld [slurmd]=slurmd
    [sbatch]=slurm-client [squeue]=slurm-client [scontrol]=slurm-client [scancel]=slurm-client
  )
  for program in "${!package[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("${package[$program]}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    die "Slurm is not installed; install it with: sudo apt-get install ${missing[*]}"
  fi
  echo "slurm_cluster.sh: installing ${missing[*]} with apt-get" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# A TCP port nobody listens on (the cluster's daemons must not clash with another cluster's).
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

write_config() {
  local cpus mem_mb user
  cpus=$(nproc)
  # Advertise 90% of the memory: slurmd drains a node that reports less than RealMemory.
  mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  user=$(id -un)
  cat >"$SLURM_CONF" <<EOF
# Written by utils/slurm_cluster.sh: a single-node cluster private to $dir.
ClusterName=comflp
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
# No cgroups and no accounting database on a bare machine (so sacct does not work: poll
# squeue / scontrol show job instead).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
# Start jobs as soon as they are submitted (the default batches them every ~3 s).
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=5
MinJobAge=600
InactiveLimit=0
SlurmdTimeout=300
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=main Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
  mkdir -p "$dir/munge"
  if [ ! -f "$dir/munge/munge.key" ]; then
    (umask 077 && head -c 1024 /dev/urandom >"$dir/munge/munge.key")
  fi
  munged --socket "$socket" --key-file "$dir/munge/munge.key" \
    --pid-file "$dir/run/munged.pid" --log-file "$dir/log/munged.log" \
    --seed-file "$dir/munge/munged.seed"
}

# Wait up to $1 seconds for the node to accept jobs.
wait_for_node() {
  local state
  for _ in $(seq $(($1 * 5))); do
    state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
    case $state in
      idle* | mixed* | allocated*) return 0 ;;
    esac
    sleep 0.2
  done
  return 1
}

start() {
  ensure_packages
  if [ -f "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    die "a cluster is already running in $dir (stop it first: $0 stop $dir)"
  fi
  rm -rf "$dir/spool" "$dir/run" "$dir/log"
  mkdir -p "$dir/spool/ctld" "$dir/spool/d" "$dir/run" "$dir/log"
  local socket_dir
  socket_dir=$(mktemp -d /tmp/comflp-munge.XXXXXX)
  chmod 755 "$socket_dir" # munged refuses a socket directory others may write to
  echo "$socket_dir" >"$dir/run/munge_socket_dir"
  socket=$socket_dir/munge.socket
  write_config
  # On any failure from here on, stop what was started and point at the logs.
  trap 'echo "slurm_cluster.sh: ERROR: start failed; see the logs in $dir/log" >&2; stop' ERR
  start_munge
  slurmctld -i
  slurmd -N localhost
  if ! wait_for_node 60; then
    echo "slurm_cluster.sh: ERROR: the node did not come up within 60 s; see $dir/log" >&2
    stop
    exit 1
  fi
  trap - ERR
  echo "export SLURM_CONF=$SLURM_CONF" >"$dir/env.sh"
  echo "export SLURM_CONF=$SLURM_CONF"
}

# Stop the daemon whose PID file is $1: SIGTERM, then SIGKILL after 10 s.
stop_daemon() {
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

stop() {
  if [ -f "$SLURM_CONF" ] && [ -f "$dir/run/slurmctld.pid" ]; then
    squeue -h -o %A 2>/dev/null | sort -u | xargs -r scancel 2>/dev/null || true
  fi
  stop_daemon "$dir/run/slurmd.pid"
  stop_daemon "$dir/run/slurmctld.pid"
  stop_daemon "$dir/run/munged.pid"
  if [ -f "$dir/run/munge_socket_dir" ]; then
    rm -rf "$(cat "$dir/run/munge_socket_dir")" "$dir/run/munge_socket_dir"
  fi
}

"$action"
