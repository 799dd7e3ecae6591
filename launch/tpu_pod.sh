#!/usr/bin/env bash
# A TPU pod slice: the same command on every worker; jax.distributed finds the pod by itself.
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh configs/mae.py gs://bucket/mae --config.model.dtype=bfloat16
set -euo pipefail
config=${1:?config}; workdir=${2:?workdir}; shift 2
gcloud compute tpus tpu-vm ssh "${TPU:?TPU name}" --zone="${ZONE:?zone}" --worker=all --command="
  cd ~/eojax && python -m eojax.main train --config=$config --workdir=$workdir $*"
