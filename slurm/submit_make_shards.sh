#!/bin/bash
# Submit a cluster shard build (run from the repository root, not with sbatch):
#   slurm/submit_make_shards.sh [SBATCH_OPTIONS] N MAKE_SHARDS_ARGS
#   slurm/submit_make_shards.sh --cpus-per-task=32 16 --input 'laion/*.tar' --out shards/laion --captions caps.jsonl
# Three jobs of slurm/make_shards.sh: prepare; an array of N parts after it; the merge after the
# array. The merge waits for every part to end, failed or not (afterany), and if a part failed it
# fails naming it; rerun that part alone, then the merge (both commands are printed below).
# SBATCH_OPTIONS (those before N, e.g. --cpus-per-task, --partition, --time) go to every job; so do
# sbatch's SBATCH_* environment variables (e.g. SBATCH_ACCOUNT, SBATCH_OUTPUT).
set -euo pipefail

die() { echo "slurm/submit_make_shards.sh: error: $*" >&2; exit 2; }

sbatch_opts=()
while (($# > 0)) && [[ $1 == -* ]]; do
    sbatch_opts+=("$1")
    shift
done
(($# >= 2)) || die "usage: slurm/submit_make_shards.sh [SBATCH_OPTIONS] N MAKE_SHARDS_ARGS (--input ... --out OUT ...)"
parts=$1
shift
[[ $parts =~ ^[1-9][0-9]*$ ]] || die "the number of parts must be a positive integer, got '$parts'"
[[ -f slurm/make_shards.sh && -f rwkvclip_dist/__init__.py ]] || die "run from the repository root"

job_id() { echo "${1%%;*}"; }  # --parsable prints "id" or "id;cluster"
prepare=$(job_id "$(sbatch "${sbatch_opts[@]}" --parsable --job-name=shards-prepare slurm/make_shards.sh prepare "$@")")
array=$(job_id "$(sbatch "${sbatch_opts[@]}" --parsable --job-name=shards-part --dependency="afterok:$prepare" \
    --kill-on-invalid-dep=yes --array="0-$((parts - 1))" slurm/make_shards.sh part "$parts" "$@")")
merge=$(job_id "$(sbatch "${sbatch_opts[@]}" --parsable --job-name=shards-merge --dependency="afterany:$array" \
    slurm/make_shards.sh merge "$@")")
echo "prepare $prepare, parts $array (array 0-$((parts - 1))), merge $merge"
echo "if part I fails: sbatch --array=I slurm/make_shards.sh part $parts ARGS, then sbatch slurm/make_shards.sh merge ARGS"
