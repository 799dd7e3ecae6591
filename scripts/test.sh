#!/usr/bin/env bash
# Set-up, then the whole test suite on 8 simulated CPU devices. EOJAX_TEST_DATA defaults to ../shared/data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export EOJAX_TEST_DATA=${EOJAX_TEST_DATA:-$(cd .. && pwd)/shared/data}
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
# Two workers (the 2-core CI machine): tests compile far more than they compute, so two processes
# overlap well; each test file stays on one worker, notebooks spread (tests/conftest.py).
exec .venv/bin/python -m pytest -q -n "${EOJAX_TEST_WORKERS:-2}" --dist loadgroup --durations=25 "$@"
