#!/usr/bin/env bash
# The quality tables in docs/benchmarks.md: for each log, every model's
# HR@10, NDCG@10, fraction of the log's Bayes ceiling (synthetic logs only),
# bytes, users/s and training time, from one committed run of its job.
#
#   scripts/bench-quality.sh [WORKDIR] [LOG...]
#
# LOGs (default: sample-1m sample-11m ml-100k ml-1m):
#   sample-1m    recdistill sample --users 18200  --items 50000 --mean-events 55, jobs/scale-10m.toml
#   sample-11m   recdistill sample --users 200000 --items 50000 --mean-events 55, jobs/scale-10m.toml
#   ml-100k      data-samples/fetch-movielens-100k.sh, jobs/movielens-100k.toml
#   ml-1m        data-samples/fetch-movielens-1m.sh,   jobs/movielens-1m.toml
# Environment: SETS (extra `--set KEY=VALUE` for every run), RUN_DATE.
set -euo pipefail
work="${1:-$(mktemp -d)}"
shift || true
logs=("$@")
[ ${#logs[@]} -gt 0 ] || logs=(sample-1m sample-11m ml-100k ml-1m)
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${CARGO_TARGET_DIR:-$here/target}/release/recdistill"
[ -x "$bin" ] || (cd "$here" && cargo build --release --locked)
command -v /usr/bin/time >/dev/null || { echo "needs GNU time (apt-get install time)" >&2; exit 1; }
read -r -a sets <<< "${SETS:-}"
set_args=()
for s in "${sets[@]}"; do set_args+=(--set "$s"); done
run_date="${RUN_DATE:-2026-12-07}"
mkdir -p "$work"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%Y-%m-%dT%H:%MZ)"

for log in "${logs[@]}"; do
  lake="$work/lake-$log"
  case "$log" in
    sample-1m|sample-11m)
      users=18200; [ "$log" = sample-11m ] && users=200000
      [ -d "$lake/interactions" ] || "$bin" sample --out "$lake" --users "$users" --items 50000 \
        --mean-events 55 --days 30 --seed 1
      job="$here/jobs/scale-10m.toml"; date=2025-01-31 ;;
    ml-100k)
      [ -d "$lake/interactions" ] || "$here/data-samples/fetch-movielens-100k.sh" "$lake" "$bin"
      job="$here/jobs/movielens-100k.toml"; date="$run_date" ;;
    ml-1m)
      [ -d "$lake/interactions" ] || "$here/data-samples/fetch-movielens-1m.sh" "$lake" "$bin"
      job="$here/jobs/movielens-1m.toml"; date="$run_date" ;;
    *) echo "unknown log $log" >&2; exit 2 ;;
  esac
  echo "== $log: $(basename "$job")"
  /usr/bin/time -f "$log run: wall %e s, peak RSS %M KiB" "$bin" run --job "$job" --lake "$lake" \
    --run-date "$date" --set warm_start.enabled=false --set publish.model='""' "${set_args[@]}" -q \
    2> >(grep -E "run: wall|^error" >&2) >/dev/null
  "$bin" sql --lake "$lake" --job "$job" --run-date "$date" -q "
    WITH e AS (
      SELECT model, MAX(size_bytes) AS bytes,
             MAX(CASE WHEN metric = 'hr' AND k = 10 THEN value END) AS hr_10,
             MAX(CASE WHEN metric = 'ndcg' AND k = 10 THEN value END) AS ndcg_10,
             MAX(CASE WHEN metric = 'ndcg' AND k = 10 THEN ceiling_fraction END) AS of_ceiling,
             MAX(CASE WHEN metric = 'ndcg' AND k = 10 THEN ceiling END) AS ceiling,
             MAX(CASE WHEN metric = 'users_per_s' THEN value END) AS users_per_s
      FROM evaluation GROUP BY model
    ),
    t AS (SELECT model, COUNT(*) AS epochs, SUM(seconds) AS train_s FROM training GROUP BY model)
    SELECT e.model, ROUND(hr_10, 4) AS hr_10, ROUND(ndcg_10, 4) AS ndcg_10,
           ROUND(of_ceiling, 3) AS of_ceiling, bytes, ROUND(users_per_s, 0) AS users_per_s,
           t.epochs, ROUND(t.train_s, 0) AS train_s, ROUND(ceiling, 4) AS ceiling_ndcg_10
    FROM e LEFT JOIN t ON e.model = t.model
    ORDER BY ndcg_10 DESC"
done
