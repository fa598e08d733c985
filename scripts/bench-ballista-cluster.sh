#!/usr/bin/env bash
# The features stage on a local Ballista cluster started with Ballista's own
# binaries (one scheduler, two executors), against the same stage in
# process, on the same lake in the same sitting (docs/benchmarks.md). Each
# executor advertises one core (`--vcores 1`), so the two of them share the
# machine as the in-process engine does.
#
#   scripts/bench-ballista-cluster.sh LAKE [JOB]
#
# LAKE: a local lake folder (e.g. one written by `recdistill sample
# --mean-events`); JOB defaults to jobs/scale-10m.toml. The binaries are
# installed once with `cargo install` into $BALLISTA_ROOT (default
# ~/.cache/ballista-55), built in a target dir of their own so the job's
# build stays warm.
set -euo pipefail
lake="$(cd "$1" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
job="${2:-$here/jobs/scale-10m.toml}"
bin="${CARGO_TARGET_DIR:-$here/target}/release/recdistill"
[ -x "$bin" ] || (cd "$here" && cargo build --release --locked)
root="${BALLISTA_ROOT:-$HOME/.cache/ballista-55}"
if [ ! -x "$root/bin/ballista-executor" ]; then
  start=$(date +%s)
  CARGO_TARGET_DIR="$root/target" cargo install --locked --root "$root" \
    ballista-scheduler@55.0.0 ballista-executor@55.0.0
  echo "cargo install of the scheduler and executor: $(( $(date +%s) - start )) s"
fi
command -v /usr/bin/time >/dev/null || { echo "needs GNU time (apt-get install time)" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
"$root/bin/ballista-scheduler" --bind-host 127.0.0.1 --bind-port 50050 >"$work/scheduler.log" 2>&1 &
pids+=($!)
sleep 2
for i in 1 2; do
  "$root/bin/ballista-executor" --scheduler-host 127.0.0.1 --scheduler-port 50050 \
    --bind-host 127.0.0.1 --external-host 127.0.0.1 \
    --bind-port $((50050 + 10 * i + 1)) --bind-grpc-port $((50050 + 10 * i + 2)) \
    --bind-health-port $((50050 + 10 * i + 3)) --vcores 1 \
    --scheduler-connect-timeout-seconds 20 \
    --work-dir "$work/executor-$i" >"$work/executor-$i.log" 2>&1 &
  pids+=($!)
done
sleep 3

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(date -u +%Y-%m-%dT%H:%MZ)"
# Each engine writes its own run date (2040-01-01 in process, 2040-01-02 on
# the cluster), twice: the second run is the warm one.
for engine in "" "df://127.0.0.1:50050"; do
  date=$([ -z "$engine" ] && echo 2040-01-01 || echo 2040-01-02)
  for attempt in 1 2; do
    label="features ${engine:-in process} (run $attempt)"
    /usr/bin/time -f "$label: wall %e s, peak RSS of recdistill %M KiB" \
      "$bin" stage features --job "$job" --lake "$lake" --run-date "$date" \
      --set "lake.engine=\"$engine\"" -q >/dev/null
  done
done
# Both engines wrote the same tables (values and order; Parquet row groups
# may be cut differently).
name="$(sed -n 's/^name *= *"\(.*\)".*/\1/p' "$job" | head -1)"
for t in item_map user_map split item_popularity stats; do
  a="$lake/recdistill/$name/run_date=2040-01-01/features/$t.parquet"
  b="$lake/recdistill/$name/run_date=2040-01-02/features/$t.parquet"
  python3 -c "
import sys, pyarrow.parquet as pq
a, b = (pq.read_table(p) for p in sys.argv[1:3])
print(sys.argv[3] + ':', f'{a.num_rows} rows,', 'the same rows in the same order' if a.equals(b) else 'DIFFER')
" "$a" "$b" "$t"
done
# What the cluster's processes held at their peak, and the tasks each
# executor ran.
names=(scheduler executor-1 executor-2)
for i in 0 1 2; do
  echo "${names[$i]}: peak RSS $(awk '/VmHWM/ {print $2, $3}' "/proc/${pids[$i]}/status")"
done
for i in 1 2; do
  echo "executor $i: $(grep -ci 'task' "$work/executor-$i.log") log lines about tasks"
done
