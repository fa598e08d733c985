#!/usr/bin/env bash
# The teacher on a GPU, checked end to end in one command of a few minutes.
#
#   scripts/gpu-check.sh [ML100K_DIR]
#
# The binary: $BIN if set, else .gpu/recdistill.xz unpacked (made by
# scripts/build-cuda.sh on a machine with Rust; unpacked with Python's lzma,
# so the GPU machine needs neither Rust nor xz), else `cargo build --release
# --features cuda` here. ML100K_DIR holds MovieLens-100K as RecBole atomic
# files (ml-100k.inter, ml-100k.item); default .gpu/ml-100k.
#
# It prints, each step in its own section (a failing step is reported and
# the next one runs):
#  1. the GPU, its driver, and the libraries the binary loads;
#  2. `bench teacher` on MovieLens-100K, the job's teacher (d128/3L) and a
#     d64/2L one, EPOCHS epochs each (no early stop) on cuda:0 and then on
#     this machine's CPU cores: median epoch time and valid NDCG@10 of each,
#     and the peak GPU memory;
#  3. the epoch of jobs/scale-10m.toml's teacher (sampled softmax, 1,024
#     shared negatives) on a synthetic log of USERS50K users over 50,000
#     items, on cuda:0 and on the CPU: the median of 3 epochs, since the
#     first use of the GPU on a fresh machine includes the driver's
#     compilation of candle's PTX kernels (cached afterwards);
#  4. the embedded sample job (`recdistill run`'s default) on cuda:0, its
#     distillation links on a full and on a sampled softmax: the evaluation
#     tables;
#  5. the whole MovieLens-100K job with --device cuda:0 (teacher and
#     distillation links on the GPU, at most JOB_EPOCHS teacher epochs,
#     stopped after JOB_TIMEOUT seconds): wall time and the evaluation table;
#  6. a summary: epoch-time ratios and NDCG@10 GPU vs CPU.
# STEPS picks among the steps 2-5 (default teacher,50k,sample,job). With $OUT
# set, the whole log is also written to $OUT/gpu-check.log.
set -uo pipefail
cd "$(dirname "$0")/.."

EPOCHS=${EPOCHS:-40}
JOB_EPOCHS=${JOB_EPOCHS:-40}
USERS50K=${USERS50K:-54500}
STEPS=${STEPS:-teacher,50k,sample,job}
JOB_TIMEOUT=${JOB_TIMEOUT:-600}
want() { [[ ",$STEPS," == *",$1,"* ]]; }
ML=${1:-.gpu/ml-100k}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"; [[ -n "${SMI_PID:-}" ]] && kill "$SMI_PID" 2>/dev/null' EXIT
if [[ -n "${OUT:-}" ]]; then
  exec > >(tee "$OUT/gpu-check.log") 2>&1
fi
section() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

section "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
nvidia-smi | sed -n 3,4p
echo "CPU: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)"
echo "glibc: $(ldd --version | head -1)"

section "binary"
if [[ -n "${BIN:-}" ]]; then
  :
elif [[ -f .gpu/recdistill.xz ]]; then
  BIN=$WORK/recdistill
  python3 -c 'import lzma, shutil, sys
with lzma.open(sys.argv[1]) as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)' .gpu/recdistill.xz "$BIN"
  chmod +x "$BIN"
  [[ -f .gpu/recdistill.needs ]] && cat .gpu/recdistill.needs
else
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/recdistill-target-cuda}
  cargo build --release --locked --features cuda || exit 1
  BIN=$CARGO_TARGET_DIR/release/recdistill
fi
# CUDA 13 libraries: the system's, else those of a Python CUDA install
# (PyTorch cu130's nvidia-* wheels), found only when the loader misses them.
if ldd "$BIN" | grep -q 'not found'; then
  for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(python3 -c 'import glob, site; print(" ".join(sorted({p for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/*/lib")})))' 2>/dev/null); do
    [[ -d "$dir" ]] && LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$dir
  done
  export LD_LIBRARY_PATH
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
fi
ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc|stdc\+\+|libc\.|not found'
if ldd "$BIN" | grep -q 'not found'; then
  echo "the libraries above marked 'not found' are missing on this machine"
  exit 1
fi
"$BIN" --version

# Peak GPU memory while a command runs: nvidia-smi sampled every 100 ms,
# less what was in use before it started.
gpu_peak() {
  local log=$WORK/smi.$RANDOM base
  base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 >"$log" &
  SMI_PID=$!
  "$@"
  local rc=$?
  kill "$SMI_PID" 2>/dev/null; wait "$SMI_PID" 2>/dev/null; SMI_PID=
  echo "peak GPU memory: $(sort -n "$log" | tail -1) MiB in use at most (${base} MiB before)"
  return $rc
}

LAKE=$WORK/lake-ml
"$BIN" import movielens --from "$ML" --lake "$LAKE" -q >/dev/null || { echo "import of $ML failed"; exit 1; }
JOB=jobs/movielens-100k.toml
declare -A EPOCH NDCG
bench_teacher() { # name device [--set ...]
  local name=$1 device=$2
  shift 2
  local out
  out=$("$BIN" bench teacher --job "$JOB" --lake "$LAKE" --epochs "$EPOCHS" --device "$device" -q "$@" 2>&1)
  echo "$out"
  EPOCH[$name]=$(sed -n 's/.*median epoch \([0-9.]*\) s.*/\1/p' <<<"$out" | head -1)
  NDCG[$name]=$(sed -n 's/.*valid NDCG@10 after the last \([0-9.]*\).*/\1/p' <<<"$out" | head -1)
}
D64=(--set models.teacher.d_model=64 --set models.teacher.layers=2 --set models.teacher.ffn=256)

if want teacher; then
  section "MovieLens-100K teacher d128/3L on cuda:0, $EPOCHS epochs"
  gpu_peak bench_teacher gpu128 cuda:0
  section "MovieLens-100K teacher d128/3L on the CPU ($(nproc) cores), $EPOCHS epochs"
  bench_teacher cpu128 cpu
  section "MovieLens-100K teacher d64/2L on cuda:0, $EPOCHS epochs"
  gpu_peak bench_teacher gpu64 cuda:0 "${D64[@]}"
  section "MovieLens-100K teacher d64/2L on the CPU ($(nproc) cores), $EPOCHS epochs"
  bench_teacher cpu64 cpu "${D64[@]}"
fi

if want 50k; then
  section "50,000 items, $USERS50K users: jobs/scale-10m.toml's teacher (sampled softmax), 3 epochs"
  LAKE50=$WORK/lake-50k
  "$BIN" sample --out "$LAKE50" --users "$USERS50K" --items 50000 --mean-events 55 -q >/dev/null &&
    for device in cuda:0 cpu; do
      echo "-- $device"
      if [[ $device == cpu ]]; then
        "$BIN" bench teacher --job jobs/scale-10m.toml --lake "$LAKE50" --epochs 3 --device "$device" -q
      else
        gpu_peak "$BIN" bench teacher --job jobs/scale-10m.toml --lake "$LAKE50" --epochs 3 --device "$device" -q
      fi
    done
fi

if want sample; then
  for softmax in full sampled; do
    section "the embedded sample job on cuda:0, distillation links on a $softmax softmax"
    lake=$WORK/lake-sample-$softmax
    start=$(date +%s)
    gpu_peak "$BIN" run --lake "$lake" --run-date 2026-01-01 --device cuda:0 -q \
      --set "distill.softmax=$softmax" --set "distill.negatives=64" >/dev/null
    echo "job exit $?, wall $(($(date +%s) - start)) s"
    "$BIN" sql --lake "$lake" --job sample --run-date 2026-01-01 -q "
      SELECT e.model, ROUND(e.value, 4) AS ndcg_10, t.epochs, ROUND(t.median_s, 3) AS median_epoch_s
      FROM evaluation e
      LEFT JOIN (SELECT model, COUNT(*) AS epochs, MEDIAN(seconds) AS median_s FROM training GROUP BY model) t
        ON t.model = e.model
      WHERE e.metric = 'ndcg' AND e.k = 10 ORDER BY e.model"
  done
fi

if want job; then
  section "the whole MovieLens-100K job on cuda:0 (teacher at most $JOB_EPOCHS epochs)"
  start=$(date +%s)
  gpu_peak timeout "$JOB_TIMEOUT" "$BIN" run --job "$JOB" --lake "$LAKE" --run-date 2026-01-01 --device cuda:0 -q \
    --set "models.teacher.epochs=$JOB_EPOCHS" --set "models.teacher.patience=$JOB_EPOCHS" >/dev/null
  echo "job exit $?, wall $(($(date +%s) - start)) s"
  "$BIN" sql --lake "$LAKE" --job movielens-100k --run-date 2026-01-01 -q "
    SELECT e.model, ROUND(e.value, 4) AS ndcg_10, t.epochs, ROUND(t.median_s, 3) AS median_epoch_s
    FROM evaluation e
    LEFT JOIN (SELECT model, COUNT(*) AS epochs, MEDIAN(seconds) AS median_s FROM training GROUP BY model) t
      ON t.model = e.model
    WHERE e.metric = 'ndcg' AND e.k = 10 ORDER BY e.model"
fi

section "summary"
for d in 128 64; do
  g=${EPOCH[gpu$d]:-} c=${EPOCH[cpu$d]:-} gn=${NDCG[gpu$d]:-} cn=${NDCG[cpu$d]:-}
  if [[ -n $g && -n $c && -n $gn && -n $cn ]]; then
    python3 -c "g, c, gn, cn = $g, $c, $gn, $cn
print(f'teacher d$d: epoch {g:.3f} s on the GPU, {c:.3f} s on $(nproc) CPU cores: GPU {c / g:.1f}x faster; valid NDCG@10 {gn:.4f} vs {cn:.4f} ({(gn / cn - 1) * 100:+.1f} %)')"
  else
    echo "teacher d$d: incomplete (gpu ${g:-?} s, cpu ${c:-?} s)"
  fi
done
