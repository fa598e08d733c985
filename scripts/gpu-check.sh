#!/usr/bin/env bash
# A short, end-to-end teacher run on a GPU, for machines that have one.
#
#   scripts/gpu-check.sh [ML100K_DIR]
#
# Builds recdistill with the `cuda` feature (needs the CUDA toolkit's nvcc),
# trains the teacher on cuda:0 — on MovieLens-100K when ML100K_DIR holds the
# RecBole atomic files (ml-100k.inter, ml-100k.item), else on a larger
# synthetic sample — and prints the device, the median epoch time and the
# teacher's test NDCG@10. Record the output in docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

EPOCHS=${EPOCHS:-20}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/recdistill-target}
BIN="$CARGO_TARGET_DIR/release/recdistill"

echo "== device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== build (cargo build --release --features cuda)"
cargo build --release --locked --features cuda

LAKE=$(mktemp -d)
trap 'rm -rf "$LAKE"' EXIT
if [[ $# -ge 1 ]]; then
  "$BIN" import movielens --from "$1" --lake "$LAKE"
  JOB=jobs/movielens-100k.toml
  NAME=movielens-100k
else
  "$BIN" sample --out "$LAKE" --users 5000 --items 2000
  JOB=jobs/sample.toml
  NAME=sample
fi

echo "== teacher on cuda:0, $EPOCHS epochs at most"
"$BIN" run --job "$JOB" --lake "$LAKE" --run-date 2026-01-01 --device cuda:0 \
  --set models.meanpool.enabled=false --set models.teacher.content=false \
  --set "models.teacher.epochs=$EPOCHS"

echo "== result"
"$BIN" sql --lake "$LAKE" --job "$NAME" "
  SELECT t.model, COUNT(*) AS epochs, MEDIAN(t.seconds) AS median_epoch_s, MAX(t.valid_ndcg_10) AS best_valid_ndcg_10,
         MAX(e.value) AS test_ndcg_10
  FROM training t JOIN evaluation e ON e.model = t.model AND e.metric = 'ndcg' AND e.k = 10
  GROUP BY t.model"
