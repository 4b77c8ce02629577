#!/usr/bin/env bash
# A real single-host SLURM cluster with TWO nodes (n1, n2), for trying slurm/*.sh on a laptop and for
# the tests:  slurm/local-cluster.sh up|down|status|env
#   up      install slurm-wlm and munge if missing (apt-get, as root), write a config under $SLURM_LOCAL_DIR
#           (default /tmp/cifar-dist-slurm), start munged (if not running), slurmctld and two slurmd
#   down    stop exactly the daemons `up` started
#   status  sinfo of the cluster
#   env     print `export SLURM_CONF=...`: run `eval "$(slurm/local-cluster.sh env)"` before sbatch/squeue
#   fail NODE     what a machine that dies looks like: the node's slurmd stops and the controller marks it
#                 down, so its jobs end (and requeue) and nothing is scheduled there
#   recover NODE  its slurmd starts again and the node returns to service
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/cifar-dist-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

installed() { command -v slurmctld >/dev/null && command -v munged >/dev/null; }

# Exit 3 (and nothing else) means "SLURM is not here and cannot be installed here": the tests skip on it.
install() {
  installed && return
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "slurm-wlm and munge are not installed and this is not root with apt-get; install them" \
      "(sudo apt-get install slurm-wlm munge) to run a local cluster" >&2
    exit 3
  fi
  # One install at a time (two test sessions, or a user's own apt-get): wait for the other, then look again.
  exec 9>"${TMPDIR:-/tmp}/cifar-dist-slurm-install.lock"
  flock -w 900 9 || { echo "gave up waiting for another install of slurm-wlm (lock held for 15 minutes)" >&2; exit 1; }
  if installed; then exec 9>&-; return; fi  # installed meanwhile; closed, so the daemons do not inherit the lock
  echo "installing slurm-wlm and munge (apt-get)..."
  local log; log=$(mktemp)
  if ! { apt-get update -qq -o DPkg::Lock::Timeout=600 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
           slurm-wlm munge; } >"$log" 2>&1; then
    echo "installing slurm-wlm and munge failed; apt-get said:" >&2
    tail -n 30 "$log" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
  exec 9>&-
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
  mkdir -p "$DIR/state" "$DIR/spool"
  # Ports outside Ray's worker ports (10002-19999) and the kernel's ephemeral range (32768-): a Ray search
  # beside the cluster (the test suite's, a user's) held 16817 once, and slurmctld could not start
  cat > "$CONF" <<EOF
ClusterName=cifardist
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-26817}
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds (default 120) before it can start again
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=300
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=${SLURMD_PORTS:-27001-27002} CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

up() {
  install
  if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    echo "already up ($DIR)"; return
  fi
  write_conf
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=128 count=1 2>/dev/null; chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
    runuser -u munge -- /usr/sbin/munged
    touch "$DIR/munged.ours"
  fi
  rm -rf "$DIR/state"/*  # a fresh controller state: no jobs from an earlier cluster
  /usr/sbin/slurmctld -c -f "$CONF"
  /usr/sbin/slurmd -N n1 -f "$CONF"
  /usr/sbin/slurmd -N n2 -f "$CONF"
  for _ in $(seq 1 50); do
    [ "$(sinfo -h -o '%t' 2>/dev/null | grep -c idle)" -ge 1 ] && [ "$(sinfo -h -N -o '%t' | grep -c idle)" = 2 ] && break
    sleep 0.2
  done
  # A daemon that could not take its port (another cluster's, or any process's) exits at once, and sinfo
  # would then answer from whatever holds the port: say so instead of going on with someone else's cluster.
  for f in slurmctld slurmd-n1 slurmd-n2; do
    if ! { [ -f "$DIR/$f.pid" ] && kill -0 "$(cat "$DIR/$f.pid")" 2>/dev/null; }; then
      log=$DIR/${f}.log
      echo "$f of $DIR did not stay up; its log says: $(grep -E 'fatal|error' "$log" 2>/dev/null | tail -n 1)" >&2
      exit 1
    fi
  done
  sinfo -N
  echo "export SLURM_CONF=$CONF   # for sbatch, squeue, scontrol in your shell"
}

stop_pidfile() {
  local f=$1
  [ -f "$f" ] || return 0
  local pid; pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true  # still there after 10 s: its port must be free for the next cluster
  fi
  rm -f "$f"
}

down() {
  stop_pidfile "$DIR/slurmd-n1.pid"
  stop_pidfile "$DIR/slurmd-n2.pid"
  stop_pidfile "$DIR/slurmctld.pid"
  if [ -f "$DIR/munged.ours" ]; then
    stop_pidfile /run/munge/munged.pid
    rm -f "$DIR/munged.ours"
  fi
  echo "down ($DIR)"
}

fail() {
  local node=${1:?usage: $0 fail NODE}
  stop_pidfile "$DIR/slurmd-$node.pid"
  scontrol update nodename="$node" state=down reason="local-cluster.sh fail"
}

recover() {
  local node=${1:?usage: $0 recover NODE}
  /usr/sbin/slurmd -N "$node" -f "$CONF"
  scontrol update nodename="$node" state=resume 2>/dev/null || true  # already back (ReturnToService=2)
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo -N; squeue ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  fail) fail "${2:-}" ;;
  recover) recover "${2:-}" ;;
  *) echo "usage: $0 up|down|status|env|fail NODE|recover NODE" >&2; exit 2 ;;
esac
