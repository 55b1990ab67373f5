#!/usr/bin/env bash
# Step 4, in two passes so that the first table comes back even if the second runs out of time; no Ollama (none there).
#   1. the rating table: every model on every test rating (the GPU's auto sizes: all 9,596; the blend fitted on every
#      validation target);
#   2. the ranking tables: every user with a liked test movie ranked among the whole unseen catalogue, SAMPLED (default
#      200) of them on the 1+99 protocol and COLD (default 200) from their first 5 ratings; its rating rows are a token 200.
#   [BUDGET=570] [SAMPLED=200] [COLD=200] bash bench/gpu_offline/evaluate.sh [movierec evaluate flags for both passes]
# BUDGET: seconds for both passes (the rating pass gets at most 330 of them).
set -u
T0=$(date +%s); cd "$(dirname "$0")/../.."
source bench/gpu_offline/env.sh
run() { timeout "$1" movierec evaluate --data $DATA --adapter $RUN/adapter --params params/default.yaml --no-deploy "${@:2}" 2>&1 \
          | grep -v -E '^\s*$|it/s\]$'; return ${PIPESTATUS[0]}; }
B=${BUDGET:-570}
run $(( B < 390 ? B - 60 : 330 )) --out $RUN/eval --ranking-users 0 "$@" > $OUT/evaluate.log; echo "== rating pass rc=$? after $(( $(date +%s) - T0 )) s"
tail -40 $OUT/evaluate.log
for f in metrics.json predictions.parquet; do cp $RUN/eval/$f $OUT/ 2>/dev/null; done
left=$(( B - ($(date +%s) - T0) ))
run $left --out $RUN/rank --eval-sample 200 --no-zero-shot --blend none --ranking-users 943 \
    --sampled-users ${SAMPLED:-200} --cold-start-users ${COLD:-200} "$@" > $OUT/ranking.log
echo "== ranking pass after $(( $(date +%s) - T0 )) s"; tail -40 $OUT/ranking.log
cp $RUN/rank/metrics.json $OUT/ranking_metrics.json 2>/dev/null; cp $RUN/rank/ranking_users.parquet $OUT/ 2>/dev/null
