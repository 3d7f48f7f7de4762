# shellcheck shell=bash
# The body every sbatch script in slurm/ shares; the scripts differ only in their #SBATCH resources
# and in what they run. Sourced from the batch shell on the first node of the allocation.
#
# What it does, in order:
#   1. finds the repository (RWKVCLIP_REPO, default: the directory sbatch was run from), sources the
#      site file (RWKVCLIP_SITE_ENV, default slurm/site.env; see slurm/site.env.example) and activates
#      the Python environment (RWKVCLIP_VENV, default <repo>/.venv) when there is one;
#   2. keys the run directory by the job name, <RWKVCLIP_RUNS>/<job name>, so a requeued job (same
#      name) or a resubmission with the same --job-name finds its checkpoints and resumes;
#   3. starts one launcher per node with srun (slurm/launch_node.sh: torchrun with a c10d rendezvous
#      on the first node), logging to <run dir>/logs/<job id>.<restart>/node<N>.log and, per rank,
#      under <run dir>/logs/<job id>.<restart>/ranks/;
#   4. turns Slurm's warning signal (--signal=B:USR1@<s>: USR1 to this batch shell <s> seconds
#      before the time limit) into "save and stop": USR1 is forwarded to every rank, which saves a
#      checkpoint and exits 0, and then the job requeues itself and resumes in its next allocation;
#   5. requeues a job whose step failed (a rank or a whole node lost: the survivors exit within
#      parallel.timeout_s) so that it resumes from its last complete checkpoint, unless the step
#      failed RWKVCLIP_MAX_FAILURES times in a row (default 2) without a new checkpoint: an error that
#      repeats (a bad recipe, a broken environment) ends the job instead of looping.
#
# Variables the sbatch script sets before calling rwkvclip_launch:
#   NPROC_PER_NODE   processes per node (default: the GPUs Slurm gave this node, else 1)

set -euo pipefail

rwkvclip_die() {
    echo "slurm/common.sh: error: $*" >&2
    exit 2
}

rwkvclip_log() {
    echo "[slurm/common.sh $(date -u +%H:%M:%S)] $*"
}

# rwkvclip_env: the repository, the site file and the Python environment, and cd to the repository
# (what every job needs; rwkvclip_setup adds the run directory and rendezvous of a training job).
rwkvclip_env() {
    [[ -n ${SLURM_JOB_ID:-} ]] || rwkvclip_die "not inside a Slurm job; submit with sbatch from the repository root"
    RWKVCLIP_REPO=${RWKVCLIP_REPO:-${SLURM_SUBMIT_DIR:-}}
    [[ -f $RWKVCLIP_REPO/rwkvclip_dist/__init__.py ]] ||
        rwkvclip_die "RWKVCLIP_REPO='$RWKVCLIP_REPO' is not the rwkvclip_dist repository;" \
            "submit from its root or export RWKVCLIP_REPO"
    local site=${RWKVCLIP_SITE_ENV:-$RWKVCLIP_REPO/slurm/site.env}
    if [[ -f $site ]]; then
        # shellcheck source=/dev/null
        source "$site"
    elif [[ -n ${RWKVCLIP_SITE_ENV:-} ]]; then
        rwkvclip_die "RWKVCLIP_SITE_ENV='$RWKVCLIP_SITE_ENV' does not exist"
    fi
    local venv=${RWKVCLIP_VENV:-$RWKVCLIP_REPO/.venv}
    if [[ -f $venv/bin/activate ]]; then
        # shellcheck source=/dev/null
        source "$venv/bin/activate"
    elif [[ -n ${RWKVCLIP_VENV:-} ]]; then
        rwkvclip_die "RWKVCLIP_VENV='$RWKVCLIP_VENV' has no bin/activate"
    fi
    command -v python >/dev/null || rwkvclip_die "no python on PATH (set RWKVCLIP_VENV or load a module in site.env)"
    # Recipes and data paths are relative to the repository root.
    cd "$RWKVCLIP_REPO"
    export RWKVCLIP_REPO
}

rwkvclip_setup() {
    rwkvclip_env
    RWKVCLIP_RUN_DIR=${RWKVCLIP_RUNS:-$RWKVCLIP_REPO/runs}/$SLURM_JOB_NAME
    RWKVCLIP_LATEST=${RWKVCLIP_LATEST:-$RWKVCLIP_RUN_DIR/checkpoints/latest}
    RWKVCLIP_LOG_DIR=$RWKVCLIP_RUN_DIR/logs/$SLURM_JOB_ID.${SLURM_RESTART_COUNT:-0}
    mkdir -p "$RWKVCLIP_LOG_DIR"

    # The rendezvous lives on the first node; the port is derived from the job id so two jobs that
    # share a node do not collide, and stays the same across requeues of one job.
    RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    RDZV_PORT=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    export RWKVCLIP_REPO RWKVCLIP_RUN_DIR RWKVCLIP_LOG_DIR RDZV_HOST RDZV_PORT NPROC_PER_NODE
}

rwkvclip_latest() {
    cat "$RWKVCLIP_LATEST" 2>/dev/null || echo none
}

# After a failed step: 0 (requeue) unless it is the RWKVCLIP_MAX_FAILURES-th failure in a row that
# saved no new checkpoint. The count lives in the run directory, across requeues.
rwkvclip_should_requeue_failure() {
    local latest_before=$1 count_file=$RWKVCLIP_RUN_DIR/.failures_without_progress failures=0
    if [[ $(rwkvclip_latest) == "$latest_before" && -f $count_file ]]; then
        failures=$(cat "$count_file")
    fi
    failures=$((failures + 1))
    echo "$failures" >"$count_file"
    ((failures < ${RWKVCLIP_MAX_FAILURES:-2}))
}

rwkvclip_signal_steps() {
    # Signals the job steps (every process of the per-node launchers), not this batch shell. Before
    # srun has started there is no step yet; the repeat in rwkvclip_forward_stop catches it later.
    scancel --signal=USR1 "$SLURM_JOB_ID" || rwkvclip_log "no job step to signal yet"
}

rwkvclip_forward_stop() {
    ((RWKVCLIP_STOP_REQUESTED)) && return 0
    RWKVCLIP_STOP_REQUESTED=1
    rwkvclip_log "USR1: time limit or preemption ahead; asking every rank to save and exit"
    rwkvclip_signal_steps
    # A rank still starting up ignores USR1 (see launch_node.sh), so repeat until the step is gone;
    # the trainer treats a repeated request as the same one.
    (
        while sleep "${RWKVCLIP_RESIGNAL_SECONDS:-20}"; do
            rwkvclip_signal_steps
        done
    ) &
    RWKVCLIP_RESIGNAL_PID=$!
}

# Armed as soon as the script sources this file: bash's default action for USR1 would end the job
# without a requeue.
RWKVCLIP_STOP_REQUESTED=0
trap rwkvclip_forward_stop USR1

# rwkvclip_launch ENTRY [ARGS...]: run ENTRY (a Python file relative to the repository) on every
# rank; call rwkvclip_setup first.
rwkvclip_launch() {
    (($# >= 1)) || rwkvclip_die "rwkvclip_launch needs the Python entry point"
    local entry=$RWKVCLIP_REPO/$1
    shift
    [[ -f $entry ]] || rwkvclip_die "entry point $entry does not exist"
    rwkvclip_log "job $SLURM_JOB_ID ($SLURM_JOB_NAME) restart ${SLURM_RESTART_COUNT:-0}:" \
        "$SLURM_NNODES node(s) x $NPROC_PER_NODE process(es), rendezvous $RDZV_HOST:$RDZV_PORT"
    rwkvclip_log "run dir $RWKVCLIP_RUN_DIR, logs $RWKVCLIP_LOG_DIR"
    rwkvclip_log "command: $entry $*"

    local srun_args=(--nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
        --output="$RWKVCLIP_LOG_DIR/node%n.log")
    # Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch; without this every
    # launcher (and its data-loader workers) would be pinned to a single CPU.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
        srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
    local latest_before
    latest_before=$(rwkvclip_latest)
    srun "${srun_args[@]}" bash "$RWKVCLIP_REPO/slurm/launch_node.sh" "$entry" "$@" &
    local srun_pid=$! status=0
    while true; do
        # A trapped signal interrupts `wait` with a status above 128 while the step still runs.
        wait "$srun_pid" && status=0 || status=$?
        if ((status > 128)) && kill -0 "$srun_pid" 2>/dev/null; then
            continue
        fi
        break
    done
    # The step is over; a warning that comes now has nothing left to stop.
    trap '' USR1
    if [[ -n ${RWKVCLIP_RESIGNAL_PID:-} ]]; then
        kill "$RWKVCLIP_RESIGNAL_PID" 2>/dev/null || true
    fi
    rwkvclip_log "job step ended with status $status"
    if ((RWKVCLIP_STOP_REQUESTED)); then
        rwkvclip_log "requeueing job $SLURM_JOB_ID to resume from its checkpoint in $RWKVCLIP_RUN_DIR"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    if ((status != 0)) && [[ ${RWKVCLIP_REQUEUE_ON_FAILURE:-1} == 1 ]]; then
        if rwkvclip_should_requeue_failure "$latest_before"; then
            rwkvclip_log "job step failed (status $status; latest checkpoint $(rwkvclip_latest)): requeueing" \
                "job $SLURM_JOB_ID to resume from it"
            scontrol requeue "$SLURM_JOB_ID"
            return 0
        fi
        rwkvclip_log "job step failed (status $status) ${RWKVCLIP_MAX_FAILURES:-2} times in a row without a" \
            "new checkpoint; not requeueing (see the logs in $RWKVCLIP_LOG_DIR)"
    elif ((status == 0)); then
        rm -f "$RWKVCLIP_RUN_DIR/.failures_without_progress"
    fi
    return "$status"
}

# rwkvclip_train RECIPE [dotted.key=value ...]: the trainer on every rank, auto-resuming in the run dir.
rwkvclip_train() {
    (($# >= 1)) || rwkvclip_die "rwkvclip_train needs a recipe"
    local recipe=$1
    shift
    rwkvclip_setup
    [[ -f $recipe ]] || rwkvclip_die "recipe $RWKVCLIP_REPO/$recipe does not exist"
    rwkvclip_launch rwkvclip_dist/train.py --recipe "$recipe" --run-dir "$RWKVCLIP_RUN_DIR" "$@"
}

# rwkvclip_evaluate [ARGS...]: tools/evaluate.py on every rank, with the arguments unchanged.
rwkvclip_evaluate() {
    rwkvclip_setup
    rwkvclip_launch tools/evaluate.py "$@"
}
