#!/usr/bin/env bash
# From nothing to a working page: clones this repository's HEAD into a temporary directory
# (../shared beside it when this checkout has one), runs `make demo` there with no pip cache,
# and times it until the page answers a segmentation request; then Ctrl-C, and a check that
# nothing is left running. Usage: scripts/time_make_demo.sh [PORT]   (default 7870)
set -euo pipefail
repo="$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)"
port="${1:-7870}"
work="$(mktemp -d /tmp/medoe-fresh-XXXX)"
git clone -q "$repo" "$work/main"
[ -d "$repo/../shared" ] && ln -s "$(cd "$repo/../shared" && pwd)" "$work/shared"
cd "$work/main"
start=$(date +%s.%N)
PIP_NO_CACHE_DIR=1 setsid make demo DEMO_PORT="$port" > "$work/make_demo.log" 2>&1 &
pid=$!
until grep -q "demo: http" "$work/make_demo.log"; do
    kill -0 "$pid" 2>/dev/null || { echo "make demo failed:"; tail -20 "$work/make_demo.log"; exit 1; }
    sleep 1
done
up=$(date +%s.%N)
.venv/bin/python - "$port" <<'PY'
import sys
from gradio_client import Client, handle_file
outputs = Client(f"http://127.0.0.1:{sys.argv[1]}/", verbose=False).predict(
    handle_file("serving/examples/street_person.png"), 0.5, [], api_name="/segment")
print(outputs[6])
PY
answered=$(date +%s.%N)
echo "$(date -u +%FT%TZ) $(nproc) cores: page up after $(echo "$up - $start" | bc) s," \
     "first segmentation answered after $(echo "$answered - $start" | bc) s"
kill -INT -- -"$pid"
wait "$pid" && echo "make demo exited 0"
sleep 2
if pgrep -f "$work/main/.venv" >/dev/null; then echo "left running:"; pgrep -af "$work/main/.venv"; exit 1; fi
echo "nothing left running"
rm -rf "$work"
