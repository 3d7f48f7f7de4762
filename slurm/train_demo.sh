#!/bin/bash
# The CPU demo (tiny model on the digits data set): 1 node, 2 CPU ranks over gloo, a few minutes.
# The same family as train_L14.sh; only the resources differ (no GPU, so the ranks are CPU processes).
#SBATCH --job-name=rwkvclip-demo
#SBATCH --nodes=1
#SBATCH --cpus-per-task=2
#SBATCH --time=00:30:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Submit from the repository root; extra arguments are dotted recipe overrides:
#   sbatch slurm/train_demo.sh [dotted.key=value ...]
# Site settings (NCCL, modules, paths, account/partition): slurm/site.env, see slurm/site.env.example.
# The run directory is ${RWKVCLIP_RUNS:-runs}/<job name>: resubmitting with the same --job-name resumes.
# The digits data must exist first: python tools/make_demo_data.py --out data/demo_digits (the recipe's
# paths are relative to recipes/, so ../data/demo_digits is this data/demo_digits).
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export DS_ACCELERATOR=cpu
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "${RWKVCLIP_REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
rwkvclip_train recipes/demo_digits.yaml "$@"
