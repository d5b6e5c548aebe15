"""Real-size rows of the inference benchmark (`python -m bench.inference --real-size`).

DeepLabv3+, PSPNet and OCR on ResNet-50c, MEDOE and baseline, random weights, at 512x1024:
latency of PyTorch eager and onnxruntime, each timed in its own process (bench/inference_probe.py)
so that memory peaks never mix; GFLOP per image; achieved GFLOP/s against the machine's fp32
GEMM roof measured in the same run; and how onnxruntime MEDOE DeepLabv3+ grows with image size
and batch (a PNG plot beside the Markdown).

- GFLOP: `torch.utils.flop_counter.FlopCounterMode` around the eager `ExportGraph` forward, run
  on a copy of the graph on the meta device (shapes only, so 1024x2048 costs nothing; the count
  equals the CPU run's, tests/test_bench_inference.py). It counts convolutions and matrix
  products (2 FLOP per multiply-add), not normalisation, activations, softmax, resize or argmax.
- Roof: the best of 3 products of two random fp32 NxN matrices (N = --gemm-size, 4096) with the
  benchmark's thread count, in torch.matmul and in a one-node onnxruntime MatMul graph; the roof
  is the faster of the two, measured before and after the rows (the higher value counts).
- Memory: each probe's peak RSS while running (VmHWM reset after loading), weights included.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.inference_probe import random_model
from bench.inference_scale_report import (  # noqa: F401 (PLOT, markdown: read through this module)
    PLOT,
    markdown,
    plot_scaling,
    ratios_and_goals,
)
from export.exporter import export_onnx
from export.graph import build_graph, graph_metadata, random_images, run_model
from export.parity import Parity, run_onnxruntime, verify
from medoe.cli import parse_hw
from medoe.config import load_config
from medoe.contract import IMAGES
from medoe.model import count_parameters
from serving.ort_memory import cpu_session

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("deeplabv3plus_r50c_cityscapes", "pspnet_r50c_cityscapes", "ocr_r50c_cityscapes")
# onnxruntime op types that run the counted FLOPs (convolutions, matrix products).
# (model, runtime) probe order per architecture: A B B A, as the tiny rows' blocks.
ORDER = (("medoe", "pytorch"), ("medoe", "onnxruntime"), ("baseline", "onnxruntime"), ("baseline", "pytorch"))


def add_arguments(parser) -> None:
    group = parser.add_argument_group("real size (opt-in)")
    group.add_argument("--real-size", action="store_true", help="add the ResNet-50c rows and the scaling plot")
    group.add_argument("--real-size-image", type=parse_hw, default=(512, 1024), metavar="HxW")
    group.add_argument("--real-size-configs", nargs="+", default=list(CONFIGS), help="named configs, one per row pair")
    group.add_argument("--real-size-backbone", help="override the configs' backbone (tests run `tiny` this way)")
    group.add_argument("--real-size-repeats", type=int, default=3, help="timed runs per probe, after one warm-up")
    group.add_argument("--scaling-sizes", nargs="+", type=parse_hw, default=[(256, 512), (512, 1024), (1024, 2048)])
    group.add_argument("--scaling-batches", nargs="+", type=int, default=[1, 2], help="at --real-size-image")
    group.add_argument("--gemm-size", type=int, default=4096, help="N of the NxN fp32 GEMM roof")


def check_arguments(args) -> str | None:
    if not args.real_size:
        return None
    if args.real_size_repeats < 1 or min(args.scaling_batches) < 1 or args.gemm_size < 16:
        return "--real-size-repeats and --scaling-batches must be positive, --gemm-size at least 16"
    for name in args.real_size_configs:
        try:
            network = load_config(name).network
            if args.real_size_backbone:
                network.replace(backbone=args.real_size_backbone)
        except ValueError as err:
            return f"--real-size-configs {name}: {err}"
    return None


def count_gflop(graph, batch: int, height: int, width: int) -> float:
    """GFLOP of one eager forward of `graph` on a batch (FlopCounterMode, on a meta-device copy)."""
    meta = copy.deepcopy(graph).to("meta")
    images = torch.zeros(batch, height, width, 3, dtype=torch.uint8, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta(images)
    return counter.get_total_flops() / 1e9


def gemm_roof(threads: int, n: int, repeats: int = 3) -> dict:
    """Best GFLOP/s of an NxN fp32 matrix product in torch.matmul and in onnxruntime's MatMul."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            tic = time.perf_counter()
            fn()
            times.append(time.perf_counter() - tic)
        return 2 * n**3 / min(times) / 1e9

    torch_gflops = best(lambda: torch.matmul(a, b))
    info = onnx.helper.make_tensor_value_info
    node = onnx.helper.make_node("MatMul", ["a", "b"], ["c"])
    float_ = onnx.TensorProto.FLOAT
    graph = onnx.helper.make_graph(
        [node], "gemm", [info("a", float_, [n, n]), info("b", float_, [n, n])], [info("c", float_, [n, n])]
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    session = cpu_session(model.SerializeToString(), threads)
    feeds = {"a": a.numpy(), "b": b.numpy()}
    ort_gflops = best(lambda: session.run(None, feeds))
    return {
        "n": n,
        "torch_matmul_gflops": round(torch_gflops, 1),
        "onnxruntime_matmul_gflops": round(ort_gflops, 1),
        "gflops": round(max(torch_gflops, ort_gflops), 1),
    }


def export_checked(graph, threads: int):
    """(ONNX bytes, a CPU session, parity failures): the export checked at an odd size against the model's forward."""
    data = export_onnx(graph, graph_metadata(graph.model, None, graph.outputs)).model.SerializeToString()
    sess = cpu_session(data, threads)
    parity = verify(
        lambda x: run_model(graph.model, x, graph.outputs),
        lambda x: run_onnxruntime(sess, x, graph.outputs),
        [(67, 93)],
        [1],
        Parity([str(c) for c in range(graph.model.config.num_classes)], {}),
    )
    return data, sess, parity.failures()


def profile_ops(data: bytes | str | Path, threads: int, images: np.ndarray, names, work: Path, runs: int = 4) -> dict:
    """onnxruntime's profiler over `runs` runs (the first one included): milliseconds per op type, per run.
    `names`: the outputs to fetch (None: all of them)."""
    sess = cpu_session(
        data if isinstance(data, bytes) else str(data), threads, profile_prefix=str(work / "ort_profile")
    )
    names = [o.name for o in sess.get_outputs()] if names is None else list(names)
    for _ in range(runs):
        sess.run(names, {IMAGES: images})
    events = json.loads(Path(sess.end_profiling()).read_text())
    per_op = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    total = sum(per_op.values())
    return {
        "total_ms": round(total, 2),
        "ops_ms": {k: round(v, 2) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
    }


def probe(runtime: str, size, batch: int, args, **model) -> dict:
    """bench/inference_probe.py in a fresh process; its JSON line."""
    command = [sys.executable, "-m", "bench.inference_probe", "--runtime", runtime, "--size", "x".join(map(str, size))]
    command += ["--batch", str(batch), "--threads", str(args.threads), "--repeats", str(args.real_size_repeats)]
    for key, value in model.items():
        if value:
            command += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"probe {' '.join(command[3:])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def row(arch: str, backbone: str, name: str, result: dict, gflop_per_image: float, parameters: int) -> dict:
    batch, seconds = result["batch"], result["median_s"]
    return {
        "arch": arch,
        "backbone": backbone,
        "model": name,
        "runtime": result["runtime"],
        "batch": batch,
        "size": result["size"],
        "latency_ms": round(seconds * 1000, 1),
        "images_per_s": round(batch / seconds, 4),
        "gflop_per_image": round(gflop_per_image, 2),
        "gflops": round(gflop_per_image * batch / seconds, 2),
        "parameters": parameters,
        **{k: result[k] for k in ("rss_loaded_mib", "rss_load_peak_mib", "rss_run_peak_mib", "rss_process_peak_mib")},
        "seconds": result["seconds"],
    }


def export_pair(config_name: str, args, work: Path, scaling_points) -> dict:
    """MEDOE and baseline of one config: random weights, GFLOP counted, exported, checked, written under `work`."""
    network = load_config(config_name).network
    network = network.replace(backbone=args.real_size_backbone or network.backbone)
    height, width = args.real_size_image
    models = {}
    for name in ("medoe", "baseline"):
        graph = build_graph(random_model(network, name))
        data, _, failures = export_checked(graph, args.threads)
        if failures:
            raise RuntimeError(f"{config_name} {name}: onnxruntime and PyTorch disagree: {'; '.join(failures)}")
        path = work / f"{Path(config_name).stem}_{name}.onnx"
        path.write_bytes(data)
        models[name] = {
            "onnx": path,
            "outputs": graph.outputs,
            "backbone": network.backbone,
            "gflop": count_gflop(graph, 1, height, width),
            "parameters": count_parameters(graph.model),
            # Only the scaling model's: its FLOPs at every (batch, H, W) point.
            "scaling_gflop": {p: count_gflop(graph, *p) for p in scaling_points} if name == "medoe" else {},
        }
    return models


def architectures(configs: list[str]) -> dict[str, str]:
    """config -> row label: its architecture (deeplabv3plus_r50c_cityscapes -> deeplabv3plus), or its name if shared."""
    short = [Path(c).stem.split("_")[0] for c in configs]
    return {c: s if short.count(s) == 1 else Path(c).stem for c, s in zip(configs, short, strict=True)}


def scaling_points(args) -> list[tuple[int, int, int]]:
    height, width = args.real_size_image
    points = [(1, h, w) for h, w in args.scaling_sizes] + [(b, height, width) for b in args.scaling_batches]
    return list(dict.fromkeys(points))


def run(args, work: Path) -> dict:
    """The real-size section of the report: rows, scaling points, roof, ratios, goals, profiles; writes the plot."""
    started, (height, width) = time.perf_counter(), args.real_size_image
    roofs = [gemm_roof(args.threads, args.gemm_size)]
    rows, exported, probes = [], {}, {}
    names = architectures(args.real_size_configs)
    for index, (config_name, arch) in enumerate(names.items()):
        models = exported[arch] = export_pair(config_name, args, work, scaling_points(args) if index == 0 else [])
        for name, runtime in ORDER:
            if runtime == "onnxruntime":
                result = probe(runtime, (height, width), 1, args, onnx=models[name]["onnx"])
            else:
                result = probe(
                    runtime, (height, width), 1, args, config=config_name, model=name, backbone=args.real_size_backbone
                )
            probes[arch, name, runtime, 1, height, width] = result
            m = models[name]
            rows.append(row(arch, m["backbone"], name, result, m["gflop"], m["parameters"]))
            print(
                f"{arch:<14} {name:<8} {runtime:<11} {height}x{width}: {result['median_s']:7.2f} s, "
                f"{m['gflop'] / result['median_s']:6.1f} GFLOP/s, peak {result['rss_run_peak_mib']} MiB"
            )
    first = next(iter(names.values()))
    scaling = []
    for (b, h, w), gflop in exported[first]["medoe"]["scaling_gflop"].items():
        # The 512x1024 batch-1 point is the row's own probe.
        result = probes.get((first, "medoe", "onnxruntime", b, h, w))
        result = result or probe("onnxruntime", (h, w), b, args, onnx=exported[first]["medoe"]["onnx"])
        seconds = result["median_s"]
        scaling.append(
            {
                "batch": b,
                "size": [h, w],
                "megapixels": round(b * h * w / 1e6, 3),
                "latency_ms": round(seconds * 1000, 1),
                "gflop": round(gflop, 2),
                "gflops": round(gflop / seconds, 2),
                "rss_run_peak_mib": result["rss_run_peak_mib"],
                "rss_loaded_mib": result["rss_loaded_mib"],
            }
        )
        print(f"scaling {first} medoe onnxruntime {b}x{h}x{w}: {seconds:.2f} s, peak {result['rss_run_peak_mib']} MiB")
    roofs.append(gemm_roof(args.threads, args.gemm_size))
    roof = max(r["gflops"] for r in roofs)
    for r in rows:
        r["roof_share"] = round(r["gflops"] / roof, 3)
    backbone = exported[first]["medoe"]["backbone"]
    section = {
        "settings": {
            "size": [height, width],
            "configs": args.real_size_configs,
            "threads": args.threads,
            "repeats": args.real_size_repeats,
            "statistic": "median latency after one warm-up",
            "memory": "VmHWM of the probe process, reset after loading (peak RSS while running, weights included)",
        },
        "gemm_roof": {"before": roofs[0], "after": roofs[1], "gflops": roof},
        "rows": rows,
        "scaling": {"model": f"{first} MEDOE ({backbone}) on onnxruntime, {args.threads} thread(s)", "points": scaling},
    }
    section["ratios"], section["goals"] = ratios_and_goals(rows)
    section["profiles"] = {}
    for arch, models in exported.items():  # where a goal is missed: where MEDOE's time goes
        if any(not g["met"] for g in section["goals"] if g["name"].endswith(f"_{arch}")):
            images = random_images(1, height, width, seed=1)
            profile = profile_ops(models["medoe"]["onnx"], args.threads, images, models["medoe"]["outputs"], work)
            section["profiles"][f"{arch}_medoe"] = profile
    if scaling:
        plot_scaling(scaling, Path(args.out_dir) / PLOT, section["scaling"]["model"])
    section["seconds"] = round(time.perf_counter() - started, 1)
    return section
