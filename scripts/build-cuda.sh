#!/usr/bin/env bash
# Builds recdistill with the `cuda` feature on a machine without a CUDA
# toolkit or GPU, and packs it to be carried to one.
#
#   scripts/build-cuda.sh [PACK_DIR]      # PACK_DIR defaults to .gpu
#
# 1. scripts/cuda-toolkit.sh puts CUDA 13.0's compiler and libraries,
#    from PyPI wheels, in $CUDA_ROOT (default ~/.cache/cuda-13.0).
# 2. cargo builds into a target dir of its own ($CUDA_TARGET_DIR, default
#    ~/.cache/recdistill-target-cuda), so the CPU build stays warm. Kernels
#    are compiled for CUDA_COMPUTE_CAP (default 90: Hopper, H100/H200).
# 3. The binary is stripped and xz-compressed into PACK_DIR/recdistill.xz
#    (Python's lzma unpacks it where xz is missing; scripts/gpu-check.sh
#    does), and the GLIBC/GLIBCXX versions and shared libraries it needs
#    are listed in PACK_DIR/recdistill.needs.
#
# On the GPU machine it needs the NVIDIA driver (libcuda.so.1, CUDA 13.0 or
# newer), glibc 2.35+, and CUDA 13 libraries: libcudart.so.13,
# libcublas.so.13 (and its libcublasLt.so.13), libcurand.so.10 (a CUDA 13
# toolkit's lib64, or the nvidia-* wheels that PyTorch cu130 installs).
set -euo pipefail
cd "$(dirname "$0")/.."

PACK=${1:-.gpu}
export CUDA_ROOT=${CUDA_ROOT:-$HOME/.cache/cuda-13.0}
export CUDA_PATH=$CUDA_ROOT
export PATH=$CUDA_ROOT/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$HOME/.cache/recdistill-target-cuda}

scripts/cuda-toolkit.sh "$CUDA_ROOT" >/dev/null
echo "== cargo build --release --locked --features cuda (sm_$CUDA_COMPUTE_CAP, into $CARGO_TARGET_DIR)"
cargo build --release --locked --features cuda

mkdir -p "$PACK"
BIN="$CARGO_TARGET_DIR/release/recdistill"
strip -o "$PACK/recdistill" "$BIN"
{
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) from $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock || echo '+changes'), sm_$CUDA_COMPUTE_CAP, CUDA 13.0"
  echo "needs:"
  objdump -p "$PACK/recdistill" | awk '/NEEDED/ {print "  " $2}'
  echo "newest symbol versions:"
  objdump -T "$PACK/recdistill" | grep -o 'GLIBC_[0-9.]*\|GLIBCXX_[0-9.]*\|CXXABI_[0-9.]*' |
    sort -t_ -k1,1 -k2,2V -u | awk -F_ '{v[$1]=$0} END {for (k in v) print "  " v[k]}'
} >"$PACK/recdistill.needs"
xz -T0 -6 -f "$PACK/recdistill"
cat "$PACK/recdistill.needs"
ls -l "$PACK/recdistill.xz"
