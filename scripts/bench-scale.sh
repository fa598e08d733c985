#!/usr/bin/env bash
# The scale figures in docs/benchmarks.md: a synthetic log written by
# `recdistill sample --mean-events`, the job run stage by stage with each
# stage's wall time and peak RSS, and DuckDB (from pip) running the same
# feature SQL on the same files in the same sitting.
#
#   scripts/bench-scale.sh [WORKDIR]
#
# Environment:
#   USERS ITEMS MEAN_EVENTS DAYS  the log (default 200000 50000 55 30: ~11 M events)
#   STAGES   stages to run, in order (default: the whole job)
#   JOB      job file (default jobs/scale-10m.toml)
#   SETS     extra `--set KEY=VALUE` arguments for every stage
#   DUCKDB   0 skips the DuckDB comparison
#   RUN_DATE the run date (default 2025-01-31)
set -euo pipefail
work="${1:-$(mktemp -d)}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${CARGO_TARGET_DIR:-$here/target}/release/recdistill"
[ -x "$bin" ] || (cd "$here" && cargo build --release --locked)
command -v /usr/bin/time >/dev/null || { echo "needs GNU time (apt-get install time)" >&2; exit 1; }
users="${USERS:-200000}" items="${ITEMS:-50000}" mean="${MEAN_EVENTS:-55}" days="${DAYS:-30}"
stages="${STAGES:-ingest features baselines teacher soft-labels distill compress evaluate commit}"
job="${JOB:-$here/jobs/scale-10m.toml}"
read -r -a sets <<< "${SETS:-}"
set_args=()
for s in "${sets[@]}"; do set_args+=(--set "$s"); done

mkdir -p "$work"
lake="$work/lake-$users-$items-$mean"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%Y-%m-%dT%H:%MZ)"
measure() {
  local label="$1"; shift
  /usr/bin/time -f "$label: wall %e s, peak RSS %M KiB" "$@" 2> >(grep -E "^$label:|^error" >&2)
}
if [ ! -d "$lake/interactions" ]; then
  measure sample "$bin" sample --out "$lake" --users "$users" --items "$items" \
    --mean-events "$mean" --days "$days" --seed 1
fi
echo "log: $(du -sh "$lake/interactions" | cut -f1) of Parquet in $(find "$lake/interactions" -name '*.parquet' | wc -l) files"

if [ "${DUCKDB:-1}" != 0 ]; then
  venv="$work/duckdb-venv"
  [ -x "$venv/bin/python" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q duckdb==2.0.1; }
  rm -rf "$work/duckdb-out"
  measure duckdb-features "$venv/bin/python" "$here/scripts/duckdb_features.py" \
    "$here/sql" "$lake" "$work/duckdb-out" "$(nproc)"
fi

run_date="${RUN_DATE:-2025-01-31}"
for stage in $stages; do
  measure "$stage" "$bin" stage "$stage" --job "$job" --lake "$lake" --run-date "$run_date" \
    "${set_args[@]}" -q >/dev/null
done
if [[ " $stages " == *" commit "* ]]; then
  "$bin" sql --lake "$lake" --job "$job" --run-date "$run_date" -q \
    "SELECT model, metric, k, ROUND(value, 4) AS value FROM evaluation WHERE k = 10 AND metric = 'ndcg' ORDER BY value DESC"
fi
