#!/bin/bash
# A throw-away Slurm cluster on localhost for the tests: munged, slurmctld and one slurmd per node
# with every state, spool, socket and log file under one directory, so it never touches /etc/slurm
# or a real cluster's daemons. cgroup-free (proctrack/linuxproc, task/none) because test machines
# and containers rarely delegate a writable cgroup tree.
#
# SLURM_TEST_NODES=N (default 1) starts N nodes on this one machine: the first is named after the
# host (so the rendezvous host of a job resolves), the others <host>-n2, <host>-n3...; each is its
# own slurmd (`slurmd -N <name>`) on its own port, with its own spool, pid and log file.
#
#   tests/slurm/cluster.sh start DIR   # writes DIR/slurm.conf, starts the daemons, waits for "idle"
#   tests/slurm/cluster.sh stop DIR    # stops what start started (by the pid files in DIR)
#   tests/slurm/cluster.sh start-node DIR NODE   # restarts one node's slurmd
#
# Clients then need SLURM_CONF=DIR/slurm.conf in their environment. SLURM_TEST_CPUS sets each node's
# CPU count (default 2). Needs root (munged and slurmd
# run as root here) and the Debian packages slurm-wlm and munge; start installs them when missing.
set -euo pipefail

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm/munge are missing and installing them needs root"
    echo "cluster.sh: installing slurm-wlm and munge" >&2
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >&2
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

node_names() {
    local host=$1 count=$2 i
    echo "$host"
    for ((i = 2; i <= count; i++)); do
        echo "$host-n$i"
    done
}

write_conf() {
    local dir=$1 host=$2 ctld_port=$3 cpus=$4 nodes=$5 name names
    cat >"$dir/slurm.conf" <<CONF
ClusterName=rwkvclip-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
# Seconds between SIGTERM and SIGKILL: the trainer must save its checkpoint inside this window.
KillWait=30
MailProg=/bin/true
# A node that stops answering is declared down after this long (a lost node's job is then requeued);
# clusters use minutes, the tests wait less.
SlurmdTimeout=10
# Pending jobs whose start time has come (a requeued job after StartTime=now+2, an array's merge once its
# dependency is met) are otherwise started by the backfill pass, every 30 s; clusters do not mind, tests do.
SchedulerParameters=sched_interval=1,bf_interval=2
CONF
    names=$(node_names "$host" "$nodes" | paste -sd, -)
    for name in $(node_names "$host" "$nodes"); do
        echo "NodeName=$name NodeAddr=127.0.0.1 Port=$(free_port) CPUs=$cpus State=UNKNOWN" >>"$dir/slurm.conf"
    done
    echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP" >>"$dir/slurm.conf"
}

wait_idle() {
    local node=$1 state=""
    for _ in $(seq 1 60); do
        state=$(sinfo --noheader --nodes="$node" --format=%T 2>/dev/null || true)
        [[ $state == idle ]] && return 0
        sleep 0.5
    done
    die "node $node not idle after 30 s (state: '${state:-none}'); see $SLURM_CONF and the logs beside it"
}

# start_node DIR NAME: (re)start one node's slurmd, e.g. after a test killed it as a lost node. In a
# cluster of several nodes each slurmd (and so every job process on its node) gets a /dev/shm of its
# own, as separate machines have: Streaming's per-node shared memory would collide otherwise.
start_node() {
    local dir=$1 name=$2
    export SLURM_CONF=$dir/slurm.conf
    mkdir -p "$dir/spool/$name"
    if ((${SLURM_TEST_NODES:-1} > 1)) || [[ $name != "$(hostname -s)" ]]; then
        # ... and CPUs of its own: node <host> the first core, <host>-nK the K-th (modulo the cores).
        local index=0
        [[ $name == *-n[0-9]* ]] && index=$((${name##*-n} - 1))
        # shellcheck disable=SC2016 # $1 is expanded by the inner sh
        taskset -c "$((index % $(nproc)))" unshare --mount --propagation private \
            sh -c 'mount -t tmpfs -o size=2g "shm-$1" /dev/shm && exec slurmd -N "$1"' sh "$name"
    else
        slurmd -N "$name"
    fi
    wait_idle "$name"
}

start() {
    local dir=$1 host node cpus
    install_packages
    mkdir -p "$dir"/{munge,state,spool,log}
    dir=$(cd "$dir" && pwd)
    chmod 0711 "$dir/munge"
    # munged refuses keys readable by others and sockets in world-writable directories.
    dd if=/dev/urandom of="$dir/munge/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" \
        --seed-file="$dir/munge/munged.seed"
    host=$(hostname -s)
    cpus=${SLURM_TEST_CPUS:-2}
    write_conf "$dir" "$host" "$(free_port)" "$cpus" "${SLURM_TEST_NODES:-1}"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -i
    for node in $(node_names "$host" "${SLURM_TEST_NODES:-1}"); do
        start_node "$dir" "$node"
    done
    echo "$dir/slurm.conf"
}

stop_pid() {
    local pid=$1
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    echo "cluster.sh: pid $pid ignored SIGTERM for 10 s; killing it" >&2
    kill -KILL "$pid" 2>/dev/null || true
}

stop_pidfile() {
    local pidfile=$1
    [[ -f $pidfile ]] || return 0
    stop_pid "$(cat "$pidfile")"
    rm -f "$pidfile"
}

# Step daemons of this cluster (and only this one): they inherited SLURM_CONF from our slurmd.
cluster_stepds() {
    local conf=$1 environ
    for environ in /proc/[0-9]*/environ; do
        [[ $(cat "${environ%/environ}/comm" 2>/dev/null) == slurmstepd ]] || continue
        if tr '\0' '\n' <"$environ" 2>/dev/null | grep -qxF "SLURM_CONF=$conf"; then
            basename "${environ%/environ}"
        fi
    done
}

stop() {
    local dir=$1 pid pidfile
    export SLURM_CONF=$dir/slurm.conf
    # Jobs first, so no job step outlives the daemons that track it.
    if [[ -f $dir/slurmctld.pid ]]; then
        scancel --full --quiet --user=root 2>/dev/null || true
        for _ in $(seq 1 60); do
            [[ -z $(squeue --noheader 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    for pidfile in "$dir"/slurmd-*.pid; do
        stop_pidfile "$pidfile"
    done
    for pid in $(cluster_stepds "$SLURM_CONF"); do
        stop_pid "$pid"
    done
    stop_pidfile "$dir/slurmctld.pid"
    stop_pidfile "$dir/munge/munged.pid"
}

usage="usage: $0 start|stop DIR, or $0 start-node DIR NODE"
[[ $# -ge 2 ]] || die "$usage"
# (Not `cmd && start ...`: set -e does not apply inside a function called from an && list.)
case $1 in
    start | stop) [[ $# -eq 2 ]] || die "$usage" ;;
    start-node) [[ $# -eq 3 ]] || die "$usage" ;;
    *) die "$usage" ;;
esac
case $1 in
    start) start "$2" ;;
    stop) stop "$2" ;;
    start-node) start_node "$2" "$3" ;;
esac
