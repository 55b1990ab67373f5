#!/usr/bin/env bash
# Step 1 and 2: keep one part of the payload outside the checkout, where it survives until the machine goes back.
set -eu
mkdir -p /root/stage && cp "$1"/part.* /root/stage/ && ls -la /root/stage
if [ "${2:-}" = check ]; then
  nvidia-smi -L
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available())'
  python3 -m pip list 2>/dev/null | grep -i -E '^(numba|numpy|rich|tabulate|seaborn|matplotlib|scikit-learn|scipy|pyarrow|tokenizers|safetensors|accelerate|huggingface.hub|pyyaml|tqdm|regex|typer|joblib|threadpoolctl|psutil) '
fi
