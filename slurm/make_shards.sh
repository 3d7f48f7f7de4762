#!/bin/bash
# Shard building across a cluster with tools/make_shards.py, one step per job; submit all of them
# with slurm/submit_make_shards.sh N ARGS (from the repository root), which chains:
#   sbatch slurm/make_shards.sh prepare ARGS                # checks the inputs, indexes the captions once
#   sbatch --array=0-15 slurm/make_shards.sh part 16 ARGS   # array task I builds part I of 16
#   sbatch slurm/make_shards.sh merge ARGS                  # after the array: one index, one report
# ARGS are make_shards.py's arguments (--input ... --out OUT --captions ...), the same for every step;
# the merge checks that the parts were built with them. A failed or killed part reruns alone and
# resumes where it stopped (sbatch --array=3 slurm/make_shards.sh part 16 ARGS), then the merge again.
# Each part runs --workers $SLURM_CPUS_PER_TASK (an explicit --workers in ARGS wins).
#SBATCH --job-name=rwkvclip-shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
#
# Site settings (modules, paths, account/partition): slurm/site.env, see slurm/site.env.example.
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "${RWKVCLIP_REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
rwkvclip_env

mode=${1:-}
(($# > 0)) && shift
workers=${SLURM_CPUS_PER_TASK:-1}
case $mode in
    prepare)
        exec python tools/make_shards.py --prepare "$@"
        ;;
    part)
        parts=${1:-}
        [[ $parts =~ ^[1-9][0-9]*$ ]] || rwkvclip_die "part mode needs the number of parts first: part N ARGS"
        shift
        [[ -n ${SLURM_ARRAY_TASK_ID:-} ]] ||
            rwkvclip_die "part mode runs as an array job: sbatch --array=0-$((parts - 1)) slurm/make_shards.sh part $parts ARGS"
        ((SLURM_ARRAY_TASK_ID < parts)) || rwkvclip_die "array index $SLURM_ARRAY_TASK_ID is not below $parts parts"
        rwkvclip_log "part $SLURM_ARRAY_TASK_ID of $parts (job $SLURM_JOB_ID)"
        exec python tools/make_shards.py --workers "$workers" "$@" --shard "$SLURM_ARRAY_TASK_ID/$parts"
        ;;
    merge)
        exec python tools/make_shards.py --workers "$workers" "$@" --merge
        ;;
    *)
        rwkvclip_die "usage: slurm/make_shards.sh prepare|part N|merge MAKE_SHARDS_ARGS (got '${mode}')"
        ;;
esac
