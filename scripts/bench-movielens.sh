#!/usr/bin/env bash
# Wall time and peak RSS of `import` + `run` on MovieLens-100K (release build),
# and each model's test metrics — the figures in docs/benchmarks.md.
#
#   scripts/bench-movielens.sh DIR_WITH_ML100K_ATOMIC_FILES [WORKDIR]
#
# DIR holds ml-100k.inter / ml-100k.item (e.g. as data-samples/fetch-movielens-100k.sh
# extracts them from the recbole==1.2.1 wheel).
set -euo pipefail
src="${1:?usage: $0 DIR_WITH_ML100K_FILES [WORKDIR]}"
work="${2:-$(mktemp -d)}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${CARGO_TARGET_DIR:-$here/target}/release/recdistill"
[ -x "$bin" ] || (cd "$here" && cargo build --release --locked)
command -v /usr/bin/time >/dev/null || { echo "needs GNU time (apt-get install time)" >&2; exit 1; }

lake="$work/lake-ml"
rm -rf "$lake"
measure() {
  local label="$1"; shift
  /usr/bin/time -f "$label: wall %e s, peak RSS %M KiB" "$@" 2> >(grep -E "^$label:" >&2) >/dev/null
}
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m); $(date -u +%Y-%m-%d)"
measure import "$bin" import movielens --from "$src" --lake "$lake"
measure run "$bin" run --job "$here/jobs/movielens-100k.toml" --lake "$lake" --run-date 2026-11-27 -q
"$bin" sql "SELECT model, metric, value FROM evaluation WHERE k = 10 ORDER BY model, metric" --lake "$lake" -q
"$bin" sql "SELECT model, COUNT(*) AS epochs, ROUND(MEDIAN(seconds), 2) AS median_epoch_s FROM training GROUP BY model" --lake "$lake" -q
