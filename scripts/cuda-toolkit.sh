#!/usr/bin/env bash
# Installs the pieces of the CUDA 13.0 toolkit that `--features cuda` builds
# with, from NVIDIA's PyPI wheels, into a folder of its own: no system CUDA,
# no root, nothing outside that folder.
#
#   scripts/cuda-toolkit.sh [DIR]        # DIR defaults to ~/.cache/cuda-13.0
#
# Then build with the environment it prints (scripts/build-cuda.sh does both).
#
# Versions are pinned to CUDA 13.0 (update 2): a GPU machine whose driver is
# CUDA 13.0 cannot load PTX made by a newer nvcc. The wheels all unpack under
# nvidia/cu13/, which is laid out like a toolkit (bin, include, lib, nvvm);
# that folder becomes DIR. Two things a linker needs are not in the wheels and
# are made here, inside DIR:
# - unversioned names (libcublas.so -> libcublas.so.13, ...), which
#   `-lcublas` looks for;
# - lib/stubs/libcuda.so, a stub of the driver library (soname libcuda.so.1)
#   defining every driver function cudarc declares, so the binary links here
#   and loads the real driver where it runs. The stub is never shipped.
set -euo pipefail

DIR=${1:-$HOME/.cache/cuda-13.0}
WHEELS=(
  nvidia-cuda-nvcc==13.0.88   # nvcc, ptxas, fatbinary, nvlink
  nvidia-nvvm==13.0.88        # cicc and libdevice, which nvcc runs
  nvidia-cuda-crt==13.0.88    # nvcc's crt headers
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85   # cuda/std, cub, thrust headers
  nvidia-cublas==13.0.2.14
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
)

if [[ -x "$DIR/bin/nvcc" && -e "$DIR/lib/stubs/libcuda.so" ]]; then
  echo "CUDA 13.0 pieces already in $DIR"
else
  STAGE=$(mktemp -d)
  trap 'rm -rf "$STAGE"' EXIT
  echo "== downloading ${#WHEELS[@]} wheels (about 770 MB)"
  python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
    -d "$STAGE/wheels" "${WHEELS[@]%%#*}"
  for wheel in "$STAGE"/wheels/*.whl; do
    python3 -m zipfile -e "$wheel" "$STAGE/unpacked"
  done
  rm -rf "$DIR"
  mkdir -p "$(dirname "$DIR")"
  mv "$STAGE/unpacked/nvidia/cu13" "$DIR"
  chmod +x "$DIR"/bin/* "$DIR"/nvvm/bin/*

  echo "== unversioned library names"
  for lib in "$DIR"/lib/lib*.so.*; do
    name=$(basename "$lib")
    ln -sf "$name" "$DIR/lib/${name%%.so.*}.so"
  done

  echo "== driver stub lib/stubs/libcuda.so"
  # The driver functions cudarc declares, read from its source in cargo's
  # registry (fetched by `cargo fetch` below if it is not there yet).
  CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1 || true)
  if [[ -z "$CUDARC" ]]; then
    (cd "$(dirname "$0")/.." && cargo fetch --locked)
    CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | tail -1)
  fi
  mkdir -p "$DIR/lib/stubs"
  grep -ho '\bfn cu[A-Za-z0-9_]*\s*(' "$CUDARC/src/driver/sys/mod.rs" |
    sed 's/^fn //; s/\s*($//' | sort -u |
    sed 's/.*/int &(void) { return 999; }/' >"$STAGE/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$DIR/lib/stubs/libcuda.so" "$STAGE/libcuda_stub.c"
  echo "   $(wc -l <"$STAGE/libcuda_stub.c") functions"
fi

"$DIR/bin/nvcc" --version | tail -2
cat <<EOF

Build with:
  export CUDA_ROOT=$DIR CUDA_PATH=$DIR PATH=$DIR/bin:\$PATH
  export CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
  CARGO_TARGET_DIR=\$HOME/.cache/recdistill-target-cuda cargo build --release --locked --features cuda
EOF
