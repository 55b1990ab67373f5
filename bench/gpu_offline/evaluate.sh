#!/usr/bin/env bash
# Step 4: every model on every test rating (the GPU's auto sizes), the ranking tables, no Ollama (none there).
set -u
T0=$(date +%s); cd "$(dirname "$0")/../.."
source bench/gpu_offline/env.sh
timeout 550 movierec evaluate --data $DATA --adapter $RUN/adapter --out $RUN/eval --params params/default.yaml --no-deploy "$@" 2>&1 \
  | tee $OUT/evaluate.log | grep -v -E '^\s*$|it/s\]$' | tail -60
echo "== evaluate rc=${PIPESTATUS[0]} after $(( $(date +%s) - T0 )) s"
for f in metrics.json predictions.parquet ranking_users.parquet; do cp $RUN/eval/$f $OUT/ 2>/dev/null; done
