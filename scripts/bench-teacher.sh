#!/usr/bin/env bash
# The teacher's figures in docs/benchmarks.md: test metrics over 3 seeds of
# jobs/movielens-100k.toml (teacher and teacher-content), epoch time next to
# the PyTorch peer in the same sitting, and step time at 2k vs 200k items
# with sampled softmax.
#
#   scripts/bench-teacher.sh DIR_WITH_ML100K_ATOMIC_FILES [WORKDIR]
#
# The peer comparison runs when PEER_PYTHON (a Python with torch) and
# PEER_SCRIPT (sasrec_torch.py) are set.
set -euo pipefail
src="${1:?usage: $0 DIR_WITH_ML100K_FILES [WORKDIR]}"
work="${2:-$(mktemp -d)}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${CARGO_TARGET_DIR:-$here/target}/release/recdistill"
[ -x "$bin" ] || (cd "$here" && cargo build --release --locked)
job="$here/jobs/movielens-100k.toml"
lake="$work/lake-ml"
rm -rf "$lake"
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m); $(date -u +%Y-%m-%d)"
"$bin" import movielens --from "$src" --lake "$lake" >/dev/null

echo "== epoch time, same config, same sitting"
if [[ -n "${PEER_PYTHON:-}" && -n "${PEER_SCRIPT:-}" ]]; then
  "$bin" bench teacher --job "$job" --lake "$lake" --epochs 10 -q \
    --peer-python "$PEER_PYTHON" --peer-script "$PEER_SCRIPT" --peer-inter "$src/ml-100k.inter"
else
  "$bin" bench teacher --job "$job" --lake "$lake" --epochs 10 -q
fi

echo "== one step at 2k vs 200k items, sampled softmax"
"$bin" bench softmax --job "$job" --lake "$lake" --items 2000,200000 --softmax sampled -q

echo "== 3 seeds of the default job (teacher stage wall time, peak RSS, test metrics)"
for seed in 42 43 44; do
  date="2026-11-$((seed - 20))"
  /usr/bin/time -f "seed $seed: job wall %e s, peak RSS %M KiB" \
    "$bin" run --job "$job" --lake "$lake" --run-date "$date" --set "seed=$seed" -q >/dev/null
  "$bin" sql --lake "$lake" --job movielens-100k --run-date "$date" -q "
    SELECT e.model, ROUND(e.value, 4) AS ndcg_10, t.epochs, ROUND(t.median_s, 3) AS median_epoch_s
    FROM evaluation e
    JOIN (SELECT model, COUNT(*) AS epochs, MEDIAN(seconds) AS median_s FROM training GROUP BY model) t ON t.model = e.model
    WHERE e.metric = 'ndcg' AND e.k = 10 ORDER BY e.model"
done
