#!/usr/bin/env bash
# GPU smoke run for a machine with one CUDA GPU (under 10 minutes): the gpu-marked tests, the vLLM engine on
# a tiny dense Qwen2 made locally (FP32-head log-prob agreement, greedy output before/after a weight sync
# through the object store and over the weight channel), and a short bf16 CISPO run with rollout=vllm.
# Writes one JSON report: $OUT/gpu_smoke.json when $OUT is set, else benchmarks/results/gpu_smoke.json.
# Extra arguments go to benchmarks/gpu_smoke.py (e.g. --only vllm_logprobs --steps 5). Not yet run on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import vllm" 2>/dev/null; then
  echo "gpu_smoke: vllm is not installed; installing the gpu extra (pip install -e '.[gpu]')"
  "$PY" -m pip install -q -e '.[gpu]'
else
  echo "gpu_smoke: vllm $("$PY" -c 'import vllm; print(vllm.__version__)') already installed"
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_smoke: no CUDA GPU visible')"
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
exec timeout 570 "$PY" benchmarks/gpu_smoke.py "$@"
