#!/usr/bin/env bash
# One command on a fresh machine: set up .venv (first time only), then run the test suite.
# Default: everything CI runs (fast + slow, GPU tests skip without a GPU). Pass pytest arguments to narrow
# it, e.g.  bash launch/test.sh -m "not slow"   (the fast selection, about a minute).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/launch/setup_env.sh"
[ "$(id -u)" != 0 ] || bash "$root/launch/docker_engine.sh" || echo "warning: Docker engine setup failed; Docker tests skip" >&2
cd "$root"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
export CISPO_CACHE=${CISPO_CACHE:-$root/.cache/cispo}
if [ $# -eq 0 ]; then set -- -m "slow or not slow"; fi
exec .venv/bin/python -m pytest "$@"
