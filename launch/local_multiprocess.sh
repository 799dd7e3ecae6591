#!/usr/bin/env bash
# N processes on localhost, each with its own CPU devices, joined by jax.distributed (gloo collectives):
# the same program a multi-host pod runs, on one machine.
#   NPROC=2 DEVICES_PER_PROC=2 launch/local_multiprocess.sh configs/mae.py:runlocal workdirs/mae_mp
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
nproc=${NPROC:-2}; per=${DEVICES_PER_PROC:-2}; port=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < nproc; i++)); do
  EOJAX_COORDINATOR="127.0.0.1:$port" EOJAX_NUM_PROCESSES=$nproc EOJAX_PROCESS_ID=$i \
  JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$per" \
    ${PYTHON:-python} -m eojax.main train --config="$config" --workdir="$workdir" --config.progress_bar=False "$@" \
    > "${workdir%/}.proc$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
echo "logs: ${workdir%/}.proc*.log"; exit $status
