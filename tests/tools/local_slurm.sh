#!/usr/bin/env bash
# local_slurm.sh: a real one-node Slurm cluster in a directory, for the Slurm tests and for
# trying the job scripts by hand: munged, slurmctld and slurmd from Debian's packages
# (slurm-wlm, munge), run as root with their own munge key and socket, private ports, and
# every state, spool, log and pid file under DIR, so nothing clashes with a system Slurm
# or munge.
#
#   tests/tools/local_slurm.sh start DIR   configure and start; prints the line to eval:
#                                          export SLURM_CONF=DIR/slurm.conf
#   tests/tools/local_slurm.sh stop DIR    cancel every job, stop the three daemons
#
# The node: this machine under its short host name, with 8 CPUs (more than a small machine
# has, so that a few one-task jobs run side by side; SlurmdParameters=config_overrides
# lets slurmd accept it) and 8 GPUs as a generic resource whose device files are
# character devices made in DIR/dev (nothing opens them: the tests train with --device
# cpu), so that the job scripts' --gpus-per-node requests are scheduled as on a GPU
# cluster. No cgroups (proctrack/linuxproc, task/none), so it runs in a container.
# cred_expire=5 cuts the wait that Slurm 22.05 imposes before a requeued job may start
# again from 121 s to 6 s. Exit status 0 when the node is idle and ready, else 1 with the
# end of the logs.
set -u

die() {
    echo "local_slurm.sh: $*" >&2
    exit 1
}

free_port() { # two free TCP ports on the loopback, from the kernel's ephemeral range
    python3 -c 'import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(" ".join(str(x.getsockname()[1]) for x in s))'
}

start() {
    local d=$1 host
    host=$(hostname -s)
    for c in munged mungekey slurmctld slurmd sinfo scontrol; do
        command -v "$c" >/dev/null || die "$c is not installed (apt-get install slurm-wlm munge)"
    done
    mkdir -p "$d" || die "cannot create $d"
    d=$(cd "$d" && pwd)
    mkdir -p "$d/munge" "$d/state" "$d/spool" "$d/dev"
    chmod 700 "$d/munge"

    # munge: a key of our own and a socket in DIR
    if ! mungekey --create --keyfile="$d/munge/munge.key" 2>/dev/null; then
        dd if=/dev/urandom of="$d/munge/munge.key" bs=1024 count=1 2>/dev/null || die "cannot make a munge key"
    fi
    chmod 600 "$d/munge/munge.key"
    munged --force --socket="$d/munge/munge.socket" --key-file="$d/munge/munge.key" \
        --pid-file="$d/munge/munged.pid" --log-file="$d/munge/munged.log" --seed-file="$d/munge/munged.seed" ||
        die "munged did not start: $(tail -n 3 "$d/munge/munged.log" 2>/dev/null)"

    # GPU device files for the gres: character devices where mknod is allowed, else plain
    # files (slurmd then logs a complaint per file but counts them all the same)
    local i
    for i in 0 1 2 3 4 5 6 7; do
        [ -e "$d/dev/gpu$i" ] || mknod "$d/dev/gpu$i" c 195 "$i" 2>/dev/null || : >"$d/dev/gpu$i"
    done

    local ports
    read -r -a ports <<<"$(free_port)"
    cat >"$d/slurm.conf" <<EOF
# written by tests/tools/local_slurm.sh
ClusterName=deltamla-test
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${ports[0]}
SlurmdPort=${ports[1]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$d/munge/munge.socket,cred_expire=5
StateSaveLocation=$d/state
SlurmdSpoolDir=$d/spool
SlurmctldPidFile=$d/slurmctld.pid
SlurmdPidFile=$d/slurmd.pid
SlurmctldLogFile=$d/slurmctld.log
SlurmdLogFile=$d/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=900
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=8 Gres=gpu:8 State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    echo "NodeName=$host Name=gpu File=$d/dev/gpu[0-7]" >"$d/gres.conf"

    export SLURM_CONF=$d/slurm.conf
    slurmctld -f "$SLURM_CONF" || die "slurmctld did not start: $(tail -n 5 "$d/slurmctld.log" 2>/dev/null)"
    slurmd -f "$SLURM_CONF" || die "slurmd did not start: $(tail -n 5 "$d/slurmd.log" 2>/dev/null)"
    for i in $(seq 1 150); do
        [ "$(sinfo -h -o %t 2>/dev/null)" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.2
    done
    echo "local_slurm.sh: the node did not become idle in 30 s: $(sinfo -h -N -o '%N %t %E' 2>&1)" >&2
    tail -n 5 "$d/slurmctld.log" "$d/slurmd.log" >&2
    return 1
}

stop_pid() { # pidfile: SIGTERM the daemon we started, then wait up to 5 s for it to go
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
}

stop() {
    local d=$1
    export SLURM_CONF=$d/slurm.conf
    if [ -e "$d/slurmctld.pid" ] && squeue -h >/dev/null 2>&1; then
        scancel --user="$(id -un)" 2>/dev/null
        # the jobs' processes end with their steps; give them a moment before slurmd goes
        for _ in $(seq 1 50); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
    fi
    stop_pid "$d/slurmd.pid"
    stop_pid "$d/slurmctld.pid"
    stop_pid "$d/munge/munged.pid"
}

case "${1:-}" in
    start) [ $# -eq 2 ] || die "usage: local_slurm.sh start DIR"; start "$2" ;;
    stop) [ $# -eq 2 ] || die "usage: local_slurm.sh stop DIR"; stop "$2" ;;
    *) die "usage: local_slurm.sh start|stop DIR" ;;
esac
