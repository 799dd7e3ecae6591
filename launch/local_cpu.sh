#!/usr/bin/env bash
# One process on this machine's CPU (or its GPUs, if jax sees them).
#   launch/local_cpu.sh configs/mae.py:runlocal workdirs/mae [--config.key=value ...]
set -euo pipefail
config=${1:?config, e.g. configs/mae.py:runlocal}; workdir=${2:?workdir}; shift 2
exec ${PYTHON:-python} -m eojax.main train --config="$config" --workdir="$workdir" "$@"
