#!/usr/bin/env bash
# Set-up, then the main job: MAE pretraining (runlocal) on the built-in synthetic GeoTIFF scenes.
# The reconstruction PNG and metrics land in ${WORKDIR:-workdirs/mae_runlocal}.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
WORKDIR=${WORKDIR:-workdirs/mae_runlocal}
.venv/bin/eojax train --config=configs/mae.py:runlocal --workdir="$WORKDIR" "$@"
echo "pictures: $(ls "$WORKDIR"/*.png)"
