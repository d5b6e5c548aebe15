"""One runtime of one model timed in this process alone: its latency and its memory peak (bench/inference_scale.py).

    python -m bench.inference_probe --runtime pytorch --config deeplabv3plus_r50c_cityscapes --model medoe \
        --size 512x1024 --batch 1 --threads 2 --repeats 3
    python -m bench.inference_probe --runtime onnxruntime --onnx GRAPH.onnx --size 512x1024 --batch 1 ...

Prints one JSON object. A fresh process per (model, runtime, shape) so that one peak never
includes another's: PyTorch's allocator and onnxruntime's arena keep what they once held.
The onnxruntime probe never imports torch. Memory, in MiB, from /proc/self/status: `rss_loaded`
(VmRSS once the model or session is ready), `rss_load_peak` (VmHWM then: start-up and loading),
`rss_run_peak` (VmHWM reset to VmRSS just before the warm-up, read after the last run: the peak
of running, weights included) and `rss_process_peak` (the larger of the two). Not getrusage's
ru_maxrss: Linux carries it over from the parent through fork and exec (it read the parent's
1.8 GiB in every probe), while VmHWM belongs to this process's own address space.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from medoe.cli import parse_dims
from medoe.contract import IMAGES


def random_model(network, name: str):
    """`network` (a ModelConfig) as `name` with seed-0 random weights; MEDOE's classes split in three groups."""
    import torch

    from medoe.model import build_model

    torch.manual_seed(0)
    model = build_model(network.replace(model=name)).eval()
    if name == "medoe":  # any split works for timing; three groups as the paper's
        c = network.num_classes
        groups = [list(range(0, c // 3)), list(range(c // 3, 2 * c // 3)), list(range(2 * c // 3, c))]
        model.set_groups(groups[: model.num_experts])
    return model


def memory() -> dict[str, float]:
    """VmRSS and VmHWM of this process, MiB (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def runner(args):
    """run(images) for the requested runtime, everything loaded."""
    if args.runtime == "onnxruntime":
        from serving.ort_memory import cpu_session

        session = cpu_session(args.onnx, args.threads)
        return lambda images: session.run(None, {IMAGES: images})
    import torch

    from export.graph import build_graph, run_torch
    from medoe.config import load_config

    torch.set_num_threads(args.threads)
    network = load_config(args.config).network
    if args.backbone:
        network = network.replace(backbone=args.backbone)
    graph = build_graph(random_model(network, args.model))
    return lambda images: run_torch(graph, images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", required=True, choices=["pytorch", "onnxruntime"])
    parser.add_argument("--onnx", help="the graph (onnxruntime)")
    parser.add_argument("--config", help="named config (pytorch)")
    parser.add_argument("--model", default="medoe", help="medoe or baseline (pytorch)")
    parser.add_argument("--backbone", help="override the config's backbone (pytorch)")
    parser.add_argument("--size", required=True, help="HxW")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    height, width = parse_dims(args.size, "HxW", "size")
    tic = time.perf_counter()
    run = runner(args)
    load_s = time.perf_counter() - tic
    images = np.random.default_rng(args.batch).integers(0, 256, (args.batch, height, width, 3), dtype=np.uint8)
    loaded = memory()
    peak_reset = reset_peak()
    run(images)  # warm-up: the first call allocates and picks kernels
    seconds = []
    for _ in range(args.repeats):
        tic = time.perf_counter()
        run(images)
        seconds.append(time.perf_counter() - tic)
    after = memory()
    result = {
        "runtime": args.runtime,
        "batch": args.batch,
        "size": [height, width],
        "seconds": [round(s, 4) for s in seconds],
        "median_s": round(float(np.median(seconds)), 4),
        "load_s": round(load_s, 2),
        "rss_loaded_mib": round(loaded["VmRSS"], 1),
        "rss_load_peak_mib": round(loaded["VmHWM"], 1),
        "rss_run_peak_mib": round(after["VmHWM"], 1) if peak_reset else None,
        "rss_process_peak_mib": round(max(loaded["VmHWM"], after["VmHWM"]), 1),
        "torch_imported": "torch" in sys.modules,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
