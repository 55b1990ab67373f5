#!/usr/bin/env bash
# movierec's GPU path in a few minutes on one GPU: bf16 LoRA on all of ML-100K's training examples, every test
# rating scored, a few 4-bit (QLoRA) steps, 2-process training when there are two GPUs; prints tokens/s, peak
# GPU memory and model FLOP utilisation against the card's peak (bench/gpu_check.py says how each is counted).
#
#   bash bench/gpu_check.sh [--out DIR] [--batch-size B] [--peak-tflops T]
#
# It installs what it needs into the project's venv ($VENV, default .venv): requirements.lock, movierec itself
# with its `cuda` extra (bitsandbytes), and the default assets (`movierec setup --no-ollama`); a second run
# reuses them. Exit codes: 0 done; 3 no CUDA GPU here, or torch cannot use it (nothing is installed or run
# without a GPU); anything else: the step that failed says why.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
export PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false

# 1. a CUDA GPU, before anything is installed
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu_check: no CUDA GPU here (nvidia-smi is missing or lists no GPU). This script measures movierec's GPU path" \
       "(bf16, 4-bit, several GPUs) and needs one; nothing was installed or run." \
       "To check the script itself on a CPU: .venv/bin/python bench/gpu_check.py --smoke" >&2
  exit 3
fi
nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu_check: GPU /'

# 2. the venv: the pinned packages, movierec with its cuda extra (bitsandbytes)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
echo "gpu_check: installing requirements.lock and movierec[cuda] into $VENV"
"$VENV/bin/pip" install -q -r requirements.lock
"$VENV/bin/pip" install -q -e '.[cuda]'
if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  "$VENV/bin/python" -c 'import torch; print(f"gpu_check: torch {torch.__version__} is built for CUDA {torch.version.cuda} and cannot use this GPU;", "check that the driver above supports that CUDA release.")' >&2
  exit 3
fi

# 3. the default assets (SmolLM2-135M-Instruct GGUF, MovieLens-100K), then the measurements
"$VENV/bin/movierec" setup --no-ollama
exec "$VENV/bin/python" bench/gpu_check.py "$@"
