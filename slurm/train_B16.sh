#!/bin/bash
# RWKV-CLIP B/16 (paper, 148M parameters) on LAION: 2 nodes x 8 H100.
# The recipe's global batch (4096) assumes 16 GPUs: more nodes scale it up (retune optimizer.lr if so).
# docs/scaling.md has the per-GPU memory and the expected efficiency of this layout.
#SBATCH --job-name=rwkvclip-B16
#SBATCH --nodes=2
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
#
# Submit from the repository root; extra arguments are dotted recipe overrides:
#   sbatch slurm/train_B16.sh [dotted.key=value ...]
# Site settings (NCCL, modules, paths, account/partition): slurm/site.env, see slurm/site.env.example.
# The run directory is ${RWKVCLIP_RUNS:-runs}/<job name>: resubmitting with the same --job-name resumes.

# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "${RWKVCLIP_REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"
rwkvclip_train recipes/rwkvclip_b16_laion.yaml "$@"
