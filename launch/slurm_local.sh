#!/usr/bin/env bash
# A real two-node SLURM on this one host, for launch/slurm.sbatch and its test (idempotent; root only).
#   bash launch/slurm_local.sh [STATE_DIR]        # default $CISPO_SLURM_STATE, else /tmp/cispo-slurm
#   bash launch/slurm_local.sh stop [STATE_DIR]   # stops the slurmctld and slurmd it started (by pid)
#   1. installs Debian's slurm-wlm and munge if slurmctld or munged is missing,
#   2. makes sure a munge key exists and munged answers (started as user munge),
#   3. writes STATE_DIR/slurm.conf: nodes n1 (NodeAddr = this host's address, the one Ray itself picks) and
#      n2 (NodeAddr=127.0.0.2, a second loopback address), each with its own slurmd port,
#   4. starts slurmctld and `slurmd -N n1`, `slurmd -N n2` unless they already run with this config,
#      and waits until sinfo shows both nodes idle.
# The last line it prints is `export SLURM_CONF=...`: eval it, then sbatch/squeue/sinfo use this cluster.
# The job script learns each node's address from `scontrol show node` (NodeAddr), so a Ray node started on
# n2 listens on 127.0.0.2 while n1's listens on the host address, as two machines would.
set -euo pipefail
action=start
if [ "${1:-}" = stop ] || [ "${1:-}" = start ]; then action=$1; shift; fi
state=$(realpath -m "${1:-${CISPO_SLURM_STATE:-/tmp/cispo-slurm}}")
conf=$state/slurm.conf
export SLURM_CONF=$conf
cpus=${CISPO_SLURM_CPUS:-2}  # logical CPUs per node (SlurmdParameters=config_overrides: may exceed cores)
t0=$SECONDS

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop_daemons() {
  local f pid
  for f in "$state"/slurmd-n1.pid "$state"/slurmd-n2.pid "$state"/slurmctld.pid; do
    pid_alive "$f" || { rm -f "$f"; continue; }
    pid=$(cat "$f")
    kill "$pid"
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$f"
  done
}

if [ "$action" = stop ]; then
  stop_daemons
  echo "slurm_local: stopped slurmctld and slurmd under $state"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "note: launch/slurm_local.sh needs root (apt, munged, slurmd); SLURM tests will skip" >&2
  exit 1
fi

if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || true
  # Keep the packages' init scripts from starting a default munged / slurmctld / slurmd.
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && made_policy=1
  fi
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
  [ "$made_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d
  echo "slurm_local: installed slurm-wlm and munge ($((SECONDS - t0)) s)"
fi

# munge: one key per host (the package usually makes it), one daemon for every SLURM on the machine.
key=/etc/munge/munge.key
if [ ! -s "$key" ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom of="$key" bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge "$key" && chmod 700 /etc/munge && chmod 400 "$key"
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  install -d -o munge -g munge -m 755 /run/munge
  install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
  # A daemon keeps every descriptor it inherits: one from the caller (a lock held by `flock`, a test's
  # pipe) would stay open as long as munged lives, so it starts with only stdin/stdout/stderr.
  (
    for fd in /proc/$BASHPID/fd/*; do
      fd=${fd##*/}
      if [ "$fd" -gt 2 ]; then eval "exec $fd>&-"; fi
    done
    exec runuser -u munge -- /usr/sbin/munged
  )
  for _ in $(seq 40); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.25; done
  munge -n | unmunge >/dev/null || { echo "slurm_local: munged does not answer" >&2; exit 1; }
  echo "slurm_local: munged started ($((SECONDS - t0)) s)"
fi

# n1 gets the address Ray picks for this host (the source address of the default route): a Ray driver given a local
# address is redirected there, so a head on 127.0.0.1 would be unreachable.
host=$(hostname -s)
host_ip=$(ip -4 route get 1.1.1.1 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p' || true)
[ -n "$host_ip" ] || host_ip=$(hostname -I 2>/dev/null | awk '{print $1}')
host_ip=${host_ip:-127.0.0.1}
mkdir -p "$state/ctld" "$state/spool"
new=$(mktemp)
cat >"$new" <<EOF
# Written by launch/slurm_local.sh: two SLURM nodes on one host.
ClusterName=cispo
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${CISPO_SLURMCTLD_PORT:-17000}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$state/jobcomp.txt
MinJobAge=3600
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd-%n.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd-%n.log
NodeName=n1 NodeHostname=$host NodeAddr=$host_ip Port=17001 CPUs=$cpus State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.2 Port=17002 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$new" "$conf"; then
  stop_daemons  # running daemons read the old config
  mv "$new" "$conf"
  chmod 644 "$conf"
else
  rm -f "$new"
fi

if ! pid_alive "$state/slurmctld.pid"; then
  slurmctld -f "$conf"
  for _ in $(seq 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
fi
for node in n1 n2; do
  pid_alive "$state/slurmd-$node.pid" || slurmd -f "$conf" -N "$node"
done
up=0
for _ in $(seq 120); do
  if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | tr '\n' ' ')" = "n1 n2 " ]; then up=1; break; fi
  sleep 0.5
done
if [ "$up" != 1 ]; then
  echo "slurm_local: nodes not idle within 60 s:" >&2
  sinfo -N -l >&2 || true
  tail -n 20 "$state/slurmctld.log" "$state"/slurmd-n*.log >&2 || true
  exit 1
fi
echo "slurm_local: ready: nodes n1 ($host_ip) and n2 (127.0.0.2), $cpus CPUs each ($((SECONDS - t0)) s)"
echo "export SLURM_CONF=$conf"
