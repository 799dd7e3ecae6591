#!/usr/bin/env bash
# Slurm, one task per GPU node (jax uses every GPU of the node); jax.distributed reads Slurm's environment.
#   sbatch --nodes=2 launch/slurm_gpu.sh configs/mae.py workdirs/mae --config.model.dtype=bfloat16
#SBATCH --job-name=eojax
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
srun python -m eojax.main train --config="$config" --workdir="$workdir" "$@"
