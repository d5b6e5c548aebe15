"""One onnxruntime memory setting, measured in this process alone (bench/memory.py runs one per setting).

    python -m bench.memory_probe --setting no_arena --large 1x3000x4000 --onnx model_repository/medoe/1/model.onnx
    python -m bench.memory_probe --setting shipped --latency 1x256x512:10 1x1024x2048:3 --onnx ...

Prints one JSON object. Memory: RSS idle (after warm-up), peak (VmHWM, reset just before the
large run), after the large run, after glibc's malloc_trim(0) and after a few small runs, in MiB.
--latency SIZE:RUNS...: the times of RUNS runs of each NxHxW batch, in ms (the bench alternates processes of
every setting, so that the load of a shared machine weighs on all alike). A fresh process per
setting: the arena and glibc's heap keep what earlier runs left, and the MALLOC_* environment
variables (process-wide) are read once, at start.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from medoe.cli import parse_dims
from medoe.contract import IMAGES
from serving.ort_memory import (
    ARENA_MAX_PIXELS,
    TRIM_DELAY_S,
    MemorySession,
    cpu_session,
    malloc_trim,
)

SHRINK = ("memory.enable_memory_arena_shrinkage", "cpu:0")
# name -> (description, how the graph is run, environment)
SETTINGS = {
    "arena": ("onnxruntime's default: CPU arena on", "arena", {}),
    "arena_shrink": ("arena on, RunOptions memory.enable_memory_arena_shrinkage = cpu:0", "arena_shrink", {}),
    "no_arena": ("SessionOptions.enable_cpu_mem_arena = False", "no_arena", {}),
    "no_arena_arena_max_2": ("no arena, MALLOC_ARENA_MAX=2", "no_arena", {"MALLOC_ARENA_MAX": "2"}),
    "no_arena_fixed_thresholds": (
        "no arena, MALLOC_MMAP_THRESHOLD_=MALLOC_TRIM_THRESHOLD_=131072",
        "no_arena",
        {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"},
    ),
    "shipped": (
        f"shipped (serving/ort_memory.py): arena up to {ARENA_MAX_PIXELS} pixels per call, above it no arena "
        "and malloc_trim at once and after TRIM_DELAY_S",
        "shipped",
        {},
    ),
}
SMALL = (1, 256, 512, 3)
MIB = 1024 * 1024


def memory() -> dict[str, float]:
    """VmRSS and VmHWM (peak since the last reset) of this process, MiB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def runner(setting: str, onnx_path: str):
    """run(images) -> outputs, as the setting runs the graph."""
    kind = SETTINGS[setting][1]
    if kind == "shipped":
        session = MemorySession(onnx_path)
        return lambda images: session.run(None, {IMAGES: images})
    session = cpu_session(onnx_path, arena=kind != "no_arena")
    run_options = ort.RunOptions()
    if kind == "arena_shrink":
        run_options.add_run_config_entry(*SHRINK)
    return lambda images: session.run(None, {IMAGES: images}, run_options)


def latency(setting: str, onnx_path: str, sizes: dict[str, int], trim_every_call: bool) -> dict[str, list[float]]:
    run = runner(setting, onnx_path)
    trim = malloc_trim() if trim_every_call else lambda _pad: 0
    times = {}
    for size, runs in sizes.items():
        images = np.random.default_rng(0).integers(0, 256, batch_shape(size), dtype=np.uint8)
        for _ in range(2):
            run(images)
            trim(0)
        times[size] = []
        for _ in range(runs):
            start = time.perf_counter()
            run(images)
            trim(0)
            times[size].append(round((time.perf_counter() - start) * 1000, 3))
    return times


def measure(setting: str, onnx_path: str, large: tuple[int, int, int, int]) -> dict:
    run = runner(setting, onnx_path)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, SMALL, dtype=np.uint8)
    for _ in range(3):
        run(small)
    idle = memory()["VmRSS"]
    images = rng.integers(0, 256, large, dtype=np.uint8)
    reset_peak()
    start = time.perf_counter()
    outputs = run(images)
    seconds = time.perf_counter() - start
    del outputs, images  # "after" counts what the run left, not its input
    time.sleep(TRIM_DELAY_S + 0.5)  # `shipped` trims once more after this delay
    peak, after = memory()["VmHWM"], memory()["VmRSS"]
    trim = malloc_trim()
    start = time.perf_counter()
    trim(0)
    trim_ms = (time.perf_counter() - start) * 1000
    after_trim = memory()["VmRSS"]
    for _ in range(5):
        run(small)
    after_small = memory()["VmRSS"]
    return {
        "setting": setting,
        "description": SETTINGS[setting][0],
        "large": list(large),
        "large_seconds": round(seconds, 2),
        "rss_mib": {
            "idle": idle,
            "peak": peak,
            "after": after,
            "after_malloc_trim": after_trim,
            "after_small_runs": after_small,
        },
        "malloc_trim_ms": round(trim_ms, 1),
    }


def batch_shape(text: str) -> tuple[int, int, int, int]:
    return (*parse_dims(text, "NxHxW", "--large"), 3)  # type: ignore[return-value]


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setting", choices=SETTINGS, required=True)
    parser.add_argument("--onnx", required=True)
    parser.add_argument("--large", help="NxHxW of the large run (memory)")
    parser.add_argument("--latency", nargs="+", help="instead: NxHxW:RUNS, timed runs of each batch size")
    parser.add_argument("--trim-every-call", action="store_true", help="with --latency: malloc_trim(0) after every run")
    args = parser.parse_args(argv)
    if bool(args.large) == bool(args.latency):
        parser.error("give one of --large (memory) or --latency (times)")
    return args


def main(argv=None) -> int:
    args = get_args(argv)
    expected = SETTINGS[args.setting][2]
    if any(os.environ.get(k) != v for k, v in expected.items()):  # glibc reads them at start only
        print(f"error: setting {args.setting} needs the environment {expected}", file=sys.stderr)
        return 2
    if args.latency:
        sizes = {size: int(runs) for size, runs in (item.split(":") for item in args.latency)}
        print(
            json.dumps({"setting": args.setting, "ms": latency(args.setting, args.onnx, sizes, args.trim_every_call)})
        )
        return 0
    print(json.dumps(measure(args.setting, args.onnx, batch_shape(args.large))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
