#!/usr/bin/env bash
# The GPU paths that never ran on the CPU machine, on a CUDA machine in under 10 minutes:
# 20 AMP training iterations, eager fp32 / TF32 / fp16 latency of the fused DeepLabv3+ MEDOE R50c
# graph at 512x1024, onnxruntime-gpu and TensorRT where installed (each skips with one line where
# not); one JSON report. Without a CUDA device: one line, exit 0.
# Usage: scripts/gpu_check.sh [REPORT.json] [gpu_check.py options]   (default work/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
report="work/gpu_check.json"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then report="$1"; shift; fi
# gpu_check.py keeps to its own --budget-s (540 s); the timeout only ends a hung run.
exec timeout --kill-after=15 600 "$python" scripts/gpu_check.py --out "$report" "$@"
