#!/bin/bash
# Zero-shot and retrieval evaluation of a checkpoint (tools/evaluate.py) on 1 node x 8 H100,
# the ranks splitting the data sets. No --signal here: an evaluation has no state worth saving, so a
# preempted evaluation is simply requeued and run again.
#SBATCH --job-name=rwkvclip-eval
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Submit from the repository root; the arguments go to tools/evaluate.py unchanged:
#   sbatch slurm/eval.sh --help
# Site settings (NCCL, modules, paths, account/partition): slurm/site.env, see slurm/site.env.example.
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "${RWKVCLIP_REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
rwkvclip_evaluate "$@"
