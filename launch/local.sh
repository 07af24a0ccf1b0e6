#!/usr/bin/env bash
# One command on a fresh machine: set up .venv (first time only), then run cispo-train with any Hydra
# overrides passed through, e.g.  bash launch/local.sh algorithm=grpo experiment.total_steps=100
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/launch/setup_env.sh"
cd "$root"
# Two shared cores: one BLAS thread per process unless the caller says otherwise.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0
exec .venv/bin/cispo-train "$@"
