#!/usr/bin/env bash
# Renders a run's report.html in headless Chromium to a PNG, to look at the
# page as its readers do (labels, chart, table).
#
#   scripts/render-report.sh RUN_FOLDER/report.html OUT.png [WIDTH HEIGHT]
#
# Needs Debian's `chromium` package (apt-get install chromium).
set -euo pipefail
report="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
out="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
width="${3:-1000}" height="${4:-1100}"
browser="$(command -v chromium || command -v chromium-browser || true)"
[ -n "$browser" ] || { echo "needs chromium (apt-get install chromium)" >&2; exit 1; }
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars \
  --user-data-dir="$profile" --window-size="$width,$height" \
  --screenshot="$out" "file://$report" 2>/dev/null
[ -s "$out" ] || { echo "chromium wrote no picture" >&2; exit 1; }
echo "$out"
