#!/bin/bash
# One launcher per node, started by srun from slurm/common.sh: torchrun with a c10d rendezvous on the
# first node of the job (RDZV_HOST:RDZV_PORT), NPROC_PER_NODE ranks on this node, each rank's stdout
# and stderr in its own file under RWKVCLIP_LOG_DIR/ranks/ (and tee'd to this node's srun log).
#
#   bash slurm/launch_node.sh ENTRY.py [ARGS...]
set -euo pipefail

for var in SLURM_JOB_ID SLURM_NNODES SLURM_NODEID RDZV_HOST RDZV_PORT NPROC_PER_NODE RWKVCLIP_LOG_DIR; do
    [[ -n ${!var:-} ]] || { echo "slurm/launch_node.sh: $var is not set; run me through slurm/common.sh" >&2; exit 2; }
done

# Slurm delivers USR1 (and TERM on scancel/requeue/preemption) to every process of the step, so each
# rank receives it directly and saves. torchrun itself must not react: by default USR1 would kill it
# and TERM makes it tear its workers down before they have saved. Ignored signals stay ignored across
# exec (so a rank ignores them too until the trainer installs its own handlers; a signal that early
# has nothing to save anyway, and Slurm's SIGKILL after KillWait still ends the step).
trap '' USR1 TERM

# The first node's launcher hosts the rendezvous store, named explicitly: torchrun's guess (does
# RDZV_HOST resolve to one of my addresses?) can pick two hosts, or the wrong one, on machines with
# several names and interfaces, and a store that leaves with its node crashes the other launchers.
is_host=false
if ((SLURM_NODEID == 0)); then
    is_host=true
fi

exec python -m torch.distributed.run \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node="$NPROC_PER_NODE" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$RDZV_HOST:$RDZV_PORT" \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-conf="is_host=$is_host" \
    --max-restarts=0 \
    --signals-to-handle=SIGINT,SIGHUP,SIGQUIT \
    --log-dir="$RWKVCLIP_LOG_DIR/ranks/node$SLURM_NODEID" \
    --redirects=3 --tee=3 \
    "$@"
