#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, to try `scripts/compare.py run --executor slurm` without a real cluster.
#
#   bash scripts/slurm_local.sh start [--dir DIR]   install slurm-wlm + munge if missing, start munged, slurmctld and
#                                                   slurmd, wait until the node is idle (running it again is harmless)
#   bash scripts/slurm_local.sh status [--dir DIR]  show the node and the queue
#   bash scripts/slurm_local.sh stop [--dir DIR]    stop slurmd and slurmctld (and munged, if this script started it)
#
# Needs root (apt-get, and slurmd must run as root) and no systemd: the daemons are started directly. Everything the
# cluster writes (config, state, spool, logs, pid files) lives under DIR (default /tmp/timm-bninit-slurm).
# /etc/slurm/slurm.conf becomes a link to DIR/slurm.conf unless it is already some other cluster's file; in that case
# export SLURM_CONF=DIR/slurm.conf in the shells that submit (the script says so).
set -euo pipefail

usage() { echo "usage: $0 start|status|stop [--dir DIR]" >&2; exit 2; }
die() { echo "slurm_local.sh: $*" >&2; exit 1; }

command_name=${1:-}
[[ $command_name == start || $command_name == stop || $command_name == status ]] || usage
shift
DIR=/tmp/timm-bninit-slurm
while (($#)); do
    case $1 in
        --dir) [[ $# -ge 2 ]] || usage; DIR=$2; shift 2 ;;
        --dir=*) DIR=${1#--dir=}; shift ;;
        *) usage ;;
    esac
done
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
CONF=$DIR/slurm.conf
SYSTEM_CONF=/etc/slurm/slurm.conf
export SLURM_CONF=$CONF
NODE=$(hostname -s)

pid_of() {  # pid_of PIDFILE: its pid, or nothing (a daemon removes its file when it exits)
    cat "$1" 2>/dev/null || true
}

alive() {  # alive PIDFILE: the process named in PIDFILE is running
    local pid
    pid=$(pid_of "$1")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

stop_daemon() {  # stop_daemon NAME PIDFILE
    local pid
    pid=$(pid_of "$2")
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
        echo "stopped $1"
    fi
    rm -f "$2"
}

node_state() {  # idle, mixed, allocated, down*, ... or nothing when the controller does not answer
    timeout 10 sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -n 1 || true
}

if [[ $command_name == status ]]; then
    sinfo -N -l && squeue
    exit
fi

if [[ $command_name == stop ]]; then
    stop_daemon slurmd "$DIR/slurmd.pid"
    stop_daemon slurmctld "$DIR/slurmctld.pid"
    if [[ -e $DIR/munged.started ]]; then  # only a munged this script started; a system one stays
        runuser -u munge -- munged --stop 2>/dev/null && echo "stopped munged"
        rm -f "$DIR/munged.started"
    fi
    exit
fi

# --- start -------------------------------------------------------------------------------------------------------
[[ $(id -u) == 0 ]] || die "run me as root: apt-get needs it and slurmd must run as root"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
        || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge (apt-get)..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge authenticates every Slurm message; Debian 12's Slurm (22.05) has no auth/slurm plugin, so it is needed.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    if [[ ! -s /etc/munge/munge.key ]]; then  # the package's postinst makes one; a stripped image may not have it
        install -d -o munge -g munge -m 700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    fi
    # munged refuses directories that others can write to, and without systemd nobody makes /run/munge
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge
    runuser -u munge -- munged
    touch "$DIR/munged.started"
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n | unmunge >/dev/null || die "munged did not start; see /var/log/munge/munged.log"
    echo "started munged"
fi

if [[ ! -e $SYSTEM_CONF || $(readlink "$SYSTEM_CONF" || true) == "$CONF" ]]; then
    mkdir -p "$(dirname "$SYSTEM_CONF")"
    ln -sfn "$CONF" "$SYSTEM_CONF"  # so sbatch, sinfo and submitit find the cluster from any shell
    conf_hint=""
else
    conf_hint="$SYSTEM_CONF belongs to another cluster: export SLURM_CONF=$CONF before submitting"
fi

if alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid"; then  # (sinfo takes 10 s to fail with no slurmctld)
    state=$(node_state)
    if [[ $state == idle || $state == mixed || $state == allocated ]]; then
        echo "Slurm is already up: node $NODE is $state (SLURM_CONF=$CONF)"
        [[ -z $conf_hint ]] || echo "$conf_hint"
        exit
    fi
fi

# The node is described with what slurmd itself detects (CPUs, sockets, cores, memory), so it is never drained for
# having less than the config says. Memory is not a consumable resource (CR_Core): jobs that ask for none can share
# the node, one per core. No accounting database: nothing to install beyond the two daemons.
if ! alive "$DIR/slurmctld.pid" && ! alive "$DIR/slurmd.pid"; then
    hardware=$(slurmd -C | head -n 1 | sed "s/^NodeName=[^ ]*/NodeName=$NODE/")
    mkdir -p "$DIR/state" "$DIR/spool"
    cat >"$CONF" <<EOF
# written by scripts/slurm_local.sh: a one-node cluster on $NODE for trying the Slurm executor
ClusterName=timm-bninit
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
# scancel sends SIGTERM, then SIGKILL KillWait seconds later (Slurm's default: 30; slurmd waits at least 5).
# submitit's jobs ignore SIGTERM (it is how Slurm announces preemption), so this is how long a cancelled job
# goes on running
KillWait=5
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$hardware NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
fi

alive "$DIR/slurmctld.pid" || { slurmctld -f "$CONF" && echo "started slurmctld"; }
alive "$DIR/slurmd.pid" || { slurmd -f "$CONF" && echo "started slurmd"; }

for _ in $(seq 120); do
    state=$(node_state)
    [[ $state == idle || $state == mixed || $state == allocated ]] && break
    # a node that was up before (state saved in DIR/state) comes back down until told otherwise
    [[ $state == down* || $state == drain* ]] && scontrol update nodename="$NODE" state=resume 2>/dev/null || true
    sleep 0.5
done
[[ $state == idle || $state == mixed || $state == allocated ]] \
    || die "node $NODE is '${state:-not answering}' after 60 s; see $DIR/slurmctld.log and $DIR/slurmd.log"
echo "Slurm is up: node $NODE is $state, partition 'local' (SLURM_CONF=$CONF)"
[[ -z $conf_hint ]] || echo "$conf_hint"
