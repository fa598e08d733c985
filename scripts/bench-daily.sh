#!/usr/bin/env bash
# Daily replay (docs/benchmarks.md, "Daily runs: cold against warm"):
# MovieLens-100K cut at 8 successive weekly run dates, each date run in
# turn twice, in two lakes, in the same sitting: cold (warm_start off) and
# warm (on: each learned model starts from the previous date's run). Prints,
# per date, the teacher's and the published student's NDCG@10 and the
# stages' wall times, then the ratios the floors are about.
#
#   scripts/bench-daily.sh DIR_WITH_ML100K_FILES [WORK_DIR]
#
# The job is jobs/movielens-100k.toml with a smaller chain so that sixteen
# runs fit in half an hour on two cores: the d64/2L teacher-content (the
# PyTorch peer's shape), one student distilled from it with the ranking
# loss, int8, no meanpool and no latency timing. Extra `--set` overrides
# may follow in RECDISTILL_SET (space-separated KEY=VALUE).
set -euo pipefail
src="$(cd "$1" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${2:-$(mktemp -d)}"
mkdir -p "$work"
bin="${CARGO_TARGET_DIR:-$here/target}/release/recdistill"
[ -x "$bin" ] || (cd "$here" && cargo build --release --locked)
job="$here/jobs/movielens-100k.toml"
dates=(1998-02-22 1998-03-01 1998-03-08 1998-03-15 1998-03-22 1998-03-29 1998-04-05 1998-04-12)
set_args=(
  --set models.meanpool.enabled=false
  --set models.teacher.d_model=64 --set models.teacher.layers=2
  --set models.teacher.ffn=64 --set models.teacher.dropout=0.2
  --set distill.assistants=[] --set distill.scratch=false
  --set 'distill.losses=["rank"]'
  --set 'compress.variants=["int8"]'
  --set evaluation.latency_users=0
)
for kv in ${RECDISTILL_SET:-}; do set_args+=(--set "$kv"); done

for mode in cold warm; do
  rm -rf "$work/lake-$mode"
  "$bin" import movielens --from "$src" --lake "$work/lake-$mode" >/dev/null
done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%Y-%m-%dT%H:%MZ); $(git -C "$here" rev-parse --short HEAD)"

# One line per (date, mode): NDCG@10 of the teacher and the student, and the
# seconds of each stage, from the committed run's evaluation and manifest.
results="$work/results.csv"
echo "date,mode,teacher_ndcg,student_ndcg,teacher_epochs,teacher_s,distill_s,total_s,exit" >"$results"
for date in "${dates[@]}"; do
  for mode in cold warm; do
    lake="$work/lake-$mode"
    warm=$([ "$mode" = warm ] && echo true || echo false)
    code=0
    "$bin" run --job "$job" --lake "$lake" --run-date "$date" -q \
      "${set_args[@]}" --set "warm_start.enabled=$warm" >"$work/$mode-$date.out" 2>"$work/$mode-$date.err" || code=$?
    # Exit 6 (committed, not published) is a result, not a failure.
    if [ "$code" != 0 ] && [ "$code" != 6 ]; then
      echo "run $mode $date failed with exit $code:" >&2
      tail -5 "$work/$mode-$date.err" >&2
      exit 1
    fi
    folder="$lake/recdistill/movielens-100k/run_date=$date"
    ndcg() {
      "$bin" sql "SELECT value FROM evaluation WHERE model = '$1' AND metric = 'ndcg' AND k = 10" \
        --lake "$lake" --run-date "$date" --format csv 2>/dev/null | sed -n 2p
    }
    python3 - "$folder" "$date" "$mode" "$(ndcg teacher-content)" "$(ndcg student-kd-teacher-rank@int8)" "$code" >>"$results" <<'EOF'
import json, sys, pyarrow.parquet as pq
folder, date, mode, teacher, student, code = sys.argv[1:]
manifest = json.load(open(f"{folder}/_SUCCESS"))
seconds = {s["name"]: s["seconds"] for s in manifest["stages"]}
epochs = pq.read_table(f"{folder}/training/teacher-content.parquet").num_rows
print(f"{date},{mode},{teacher},{student},{epochs},{seconds['teacher']:.1f},"
      f"{seconds['distill']:.1f},{sum(seconds.values()):.1f},{code}")
EOF
    tail -1 "$results"
  done
done

python3 - "$results" <<'EOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
by = {(r["date"], r["mode"]): r for r in rows}
dates = sorted({r["date"] for r in rows})
print()
print("| run date | teacher NDCG@10 cold | warm | ratio | student@int8 NDCG@10 cold | warm | teacher epochs cold / warm | teacher s cold / warm | whole run s cold / warm | warm exit |")
print("|---|---|---|---|---|---|---|---|---|---|")
ratios, cold_t, warm_t = [], 0.0, 0.0
for d in dates:
    c, w = by[(d, "cold")], by[(d, "warm")]
    ratio = float(w["teacher_ndcg"]) / float(c["teacher_ndcg"])
    # The first date has no earlier run: both start cold.
    if d != dates[0]:
        ratios.append(ratio)
        cold_t += float(c["teacher_s"])
        warm_t += float(w["teacher_s"])
    print(f"| {d} | {float(c['teacher_ndcg']):.4f} | {float(w['teacher_ndcg']):.4f} | {ratio:.3f} | "
          f"{float(c['student_ndcg']):.4f} | {float(w['student_ndcg']):.4f} | {c['teacher_epochs']} / {w['teacher_epochs']} | "
          f"{c['teacher_s']} / {w['teacher_s']} | {c['total_s']} / {w['total_s']} | {w['exit']} |")
print()
print(f"dates 2-{len(dates)} (the first starts cold in both lakes):")
print(f"warm / cold teacher NDCG@10, mean of the ratios: {sum(ratios) / len(ratios):.3f} (floor >= 0.98)")
print(f"warm / cold teacher training time, summed: {warm_t:.1f} / {cold_t:.1f} s = {warm_t / cold_t:.3f} (floor <= 0.333)")
EOF
