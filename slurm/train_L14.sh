#!/bin/bash
# RWKV-CLIP L/14 (224 px, 256 image tokens, 500M parameters) on LAION-400M: 8 nodes x 8 H100.
# The recipe's global batch (8192) assumes 64 GPUs: more nodes scale it up (retune optimizer.lr if so).
# docs/scaling.md has the per-GPU memory and the expected efficiency of this layout.
#SBATCH --job-name=rwkvclip-L14
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Submit from the repository root; extra arguments are dotted recipe overrides:
#   sbatch slurm/train_L14.sh [dotted.key=value ...]
# Site settings (NCCL, modules, paths, account/partition): slurm/site.env, see slurm/site.env.example.
# The run directory is ${RWKVCLIP_RUNS:-runs}/<job name>: resubmitting with the same --job-name resumes.

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "${RWKVCLIP_REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
rwkvclip_train recipes/rwkvclip_l14_laion.yaml "$@"
