"""Single-core speed of SyntheticStreets; writes docs/benchmark_synthetic.{md,json}.

python -m bench.data [--num 200 --height 256 --width 512]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from bench import report as reporting
from medoe.data.synthetic import SyntheticStreets

GOAL_SIZE, GOAL_IMAGES_PER_S = (256, 512), 50


def pin_one_core() -> str:
    # Threads alone are not enough: numpy/cv2 could still migrate; pin the process as well.
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if hasattr(os, "sched_setaffinity"):
        core = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {core})
        return f"pinned to logical CPU {core}; torch/cv2 threads = 1"
    return "torch/cv2 threads = 1 (no CPU pinning on this platform)"


def measure(height: int, width: int, num: int, label_only: bool) -> dict:
    ds = SyntheticStreets(num_images=num, height=height, width=width, seed=0)
    fetch = ds.label_map if label_only else ds.load
    for i in range(min(5, num)):  # warm caches and lazy imports
        fetch(i)
    times = []
    start = time.perf_counter()
    for i in range(num):
        t0 = time.perf_counter()
        fetch(i)
        times.append(time.perf_counter() - t0)
    total = time.perf_counter() - start
    ms = np.asarray(times) * 1000
    return {
        "resolution": f"{height}x{width}",
        "what": "label only (label_map)" if label_only else "image + label (load)",
        "images": num,
        "seconds": round(total, 4),
        "images_per_s": round(num / total, 1),
        "ms_per_image": round(1000 * total / num, 3),
        "ms_p50": round(float(np.percentile(ms, 50)), 3),
        "ms_p95": round(float(np.percentile(ms, 95)), 3),
    }


def to_markdown(report: dict) -> list[str]:
    lines = reporting.header_markdown("SyntheticStreets generation speed (one CPU core)", report)
    lines[-1:-1] = [f"- Software: numpy {np.__version__}, OpenCV {cv2.__version__}", f"- Setup: {report['setup']}"]
    lines += [
        "| resolution | what | images | images/s | ms/image | p50 ms | p95 ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['resolution']} | {r['what']} | {r['images']} | {r['images_per_s']} | "
            f"{r['ms_per_image']} | {r['ms_p50']} | {r['ms_p95']} |"
        )
    lines += [
        "",
        *reporting.goals_markdown(report["goals"]),
        "",
        "Regenerate with the command above; `benchmark_synthetic.json` holds the same numbers.",
    ]
    return lines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=200, help="images per measurement")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--out-dir", type=Path, default=reporting.DOCS_DIR, help="where the .md/.json go")
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error("--num must be >= 1")
    setup = pin_one_core()
    # The goal size is always measured, plus the requested size and twice it.
    sizes = [GOAL_SIZE, (args.height, args.width), (2 * args.height, 2 * args.width)]
    sizes = list(dict.fromkeys(sizes))
    results = []
    for height, width in sizes:
        for label_only in (False, True):
            results.append(measure(height, width, args.num, label_only))
            print(json.dumps(results[-1]), file=sys.stderr)
    goal_rate = next(
        r["images_per_s"]
        for r in results
        if r["resolution"] == "x".join(map(str, GOAL_SIZE)) and r["what"].startswith("image")
    )
    report = {
        **reporting.provenance("bench.data", argv),
        "setup": setup,
        "results": results,
        "goals": [
            reporting.goal("synthetic_{}x{}_images_per_s".format(*GOAL_SIZE), goal_rate, GOAL_IMAGES_PER_S, ">=")
        ],
    }
    reporting.write_report(args.out_dir, "benchmark_synthetic", report, to_markdown(report))
    print(
        f"wrote {args.out_dir / 'benchmark_synthetic.md'} and .json; "
        f"{goal_rate} images/s at {GOAL_SIZE[0]}x{GOAL_SIZE[1]}",
        file=sys.stderr,
    )
    return 0 if report["goals"][0]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
