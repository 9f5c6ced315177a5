#!/usr/bin/env bash
# A Slurm cluster on this machine, for running the templates under the real daemons (tests, trials).
#
#   bash launch/slurm/local_cluster.sh up [NODES]     # NODES slurmd daemons on this host (default 1)
#   export SLURM_CONF=runs/slurm-local/slurm.conf     # then sbatch, squeue, scontrol, sinfo as usual
#   bash launch/slurm/local_cluster.sh down
#
# up: installs Debian's slurm-wlm and munge with apt-get if slurmctld is missing (needs root), writes
# STATE/slurm.conf (one partition "cpu"; each node gets this host's CPUs and a share of its memory; no
# accounting, no cgroups: proctrack/linuxproc, task/none), starts munged (its own key and socket),
# slurmctld and the slurmd daemons, and waits until sinfo shows every node idle. With NODES > 1 the
# slurmd daemons run as nodes n1..nN on this one host (different ports and spool folders), so they
# share the same cores. Jobs run as root (SlurmUser=root). A cluster already up is left as it is.
# down: cancels this cluster's jobs, then stops the daemons it started, by the ids in STATE/*.pid.
#
# Environment: SLURM_LOCAL_DIR (STATE, default runs/slurm-local under the checkout), SLURM_LOCAL_PORT
# (slurmctld's port, default 6817; node i listens on PORT + i).
set -euo pipefail

die() { echo "error: local_cluster.sh: $*" >&2; exit 2; }
log() { echo "$(date -Is) local_cluster: $*" >&2; }

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
STATE=${SLURM_LOCAL_DIR:-$ROOT/runs/slurm-local}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
PORT=${SLURM_LOCAL_PORT:-6817}
CONF=$STATE/slurm.conf
export SLURM_CONF=$CONF

# pid_alive FILE NAME: the pid in FILE runs a program called NAME (not a reused pid).
pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed and this is not root: apt-get install -y slurm-wlm munge"
  command -v apt-get >/dev/null || die "slurm-wlm and munge are not installed and there is no apt-get here"
  log "installing slurm-wlm and munge with apt-get"
  local t0=$SECONDS
  apt-get update -q >"$STATE/apt.log" 2>&1 || die "apt-get update failed (see $STATE/apt.log)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$STATE/apt.log" 2>&1 \
    || die "apt-get install slurm-wlm munge failed (see $STATE/apt.log)"
  log "installed in $((SECONDS - t0)) s"
}

write_conf() {
  local nodes=$1 host cpus mem_mb i
  host=$(hostname -s)
  cpus=$(nproc)
  mem_mb=$(awk -v n="$nodes" '/^MemTotal:/ { print int($2 / 1024 / n * 0.9) }' /proc/meminfo)
  cat >"$CONF" <<EOF
# Written by launch/slurm/local_cluster.sh up: a throw-away cluster on $host.
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again cred_expire + 1 s after its requeue (default 120 s).
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
# No cgroups in containers: track processes through /proc, bind no tasks.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# Without a database, the jobs' end states and exit codes go to a text file.
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/jobcomp.log
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Pending jobs (a requeued one once eligible again) are looked at every 2 s, not every 60 s.
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs stay visible to scontrol show job for an hour (there is no sacct without a database).
MinJobAge=3600
KillWait=30
EOF
  for ((i = 1; i <= nodes; i++)); do
    echo "NodeName=$(node_name "$nodes" "$i") NodeHostName=$host NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN" >>"$CONF"
  done
  echo "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP" >>"$CONF"
}

# node_name NODES I: this host's name for a one-node cluster (what slurmd finds by itself), else nI.
node_name() {
  if [ "$1" = 1 ]; then hostname -s; else echo "n$2"; fi
}

start_munge() {
  pid_alive "$STATE/munged.pid" munged && return 0
  mkdir -p "$STATE/munge"
  chmod 700 "$STATE/munge"
  [ -f "$STATE/munge/munge.key" ] || mungekey --create --keyfile "$STATE/munge/munge.key" >/dev/null
  chmod 400 "$STATE/munge/munge.key"
  munged --key-file "$STATE/munge/munge.key" --socket "$STATE/munge/munge.socket" \
    --pid-file "$STATE/munged.pid" --log-file "$STATE/log/munged.log" \
    --seed-file "$STATE/munge/munged.seed" --force \
    || die "munged did not start (see $STATE/log/munged.log)"
}

wait_idle() {
  local nodes=$1 deadline=$((SECONDS + 60)) states
  while ((SECONDS < deadline)); do
    states=$(sinfo -h -N -o '%N %t' 2>/dev/null || true)
    if [ "$(grep -c ' idle$' <<<"$states")" = "$nodes" ]; then
      log "up: $(tr '\n' ' ' <<<"$states")(SLURM_CONF=$CONF)"
      return 0
    fi
    sleep 1
  done
  die "nodes not idle after 60 s: ${states:-no answer from slurmctld} (logs in $STATE/log)"
}

up() {
  local nodes=${1:-1} i name
  [[ $nodes =~ ^[1-9][0-9]*$ ]] || die "NODES=$nodes: give a node count >= 1"
  install_packages
  mkdir -p "$STATE/ctld" "$STATE/log"
  if pid_alive "$STATE/slurmctld.pid" slurmctld; then
    log "slurmctld already running (pid $(cat "$STATE/slurmctld.pid")); left as it is"
    wait_idle "$(grep -c '^NodeName=' "$CONF")"
    return 0
  fi
  write_conf "$nodes"
  start_munge
  slurmctld -i -f "$CONF" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
  for ((i = 1; i <= nodes; i++)); do
    name=$(node_name "$nodes" "$i")
    mkdir -p "$STATE/spool/$name"
    slurmd -f "$CONF" -N "$name" || die "slurmd $name did not start (see $STATE/log/slurmd-$name.log)"
  done
  wait_idle "$nodes"
}

# stop FILE NAME: TERM to the daemon whose pid FILE holds, KILL after 30 s.
stop() {
  local pid i
  pid_alive "$1" "$2" || { rm -f "$1"; return 0; }
  pid=$(cat "$1")
  kill -TERM "$pid"
  for ((i = 0; i < 300; i++)); do
    [ -d "/proc/$pid" ] || break
    sleep 0.1
  done
  if [ -d "/proc/$pid" ]; then
    log "$2 ($pid) still running after 30 s: SIGKILL"
    kill -KILL "$pid" || true
  fi
  log "stopped $2 ($pid)"
  rm -f "$1"
}

down() {
  local f i jobs
  if pid_alive "$STATE/slurmctld.pid" slurmctld; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      log "cancelling jobs $(echo $jobs)"
      # shellcheck disable=SC2086
      scancel $jobs || true
      for ((i = 0; i < 60; i++)); do
        [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
        sleep 1
      done
    fi
  fi
  for f in "$STATE"/slurmd-*.pid; do
    [ -e "$f" ] && stop "$f" slurmd
  done
  stop "$STATE/slurmctld.pid" slurmctld
  stop "$STATE/munged.pid" munged
}

case "${1:-}" in
  up) up "${2:-1}" ;;
  down) down ;;
  *) die "usage: local_cluster.sh up [NODES] | down" ;;
esac
