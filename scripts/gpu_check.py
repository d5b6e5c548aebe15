"""The GPU paths that never ran on the CPU machine, checked in one go on a CUDA machine (< 10 minutes).

    scripts/gpu_check.sh [REPORT.json]        # or: python scripts/gpu_check.py --out work/gpu_check.json

1. training: 20 AMP iterations of `training.train --device cuda` on the tiny synthetic config
   (stage 1, then 4 of stage 2; `amp` forced on, 64 generated training images), its losses finite;
2. eager: the fused graph (ExportGraph of DeepLabv3+ MEDOE R50c, random weights) at 512x1024,
   batch 1, in fp32 (TF32 off), TF32 (cuDNN's default) and fp16 autocast: median latency with the
   input already on the GPU and from host to host, peak GPU memory, label agreement with fp32;
3. onnxruntime-gpu: the exported graph on CUDAExecutionProvider, host to host;
4. TensorRT: `export/to_trt.py --fp16` at 1x512x1024x3 (its own check against onnxruntime CPU
   included), then the engine's latency, host to host (EngineRunner's copies included).

Steps 3 and 4 skip with one line when onnxruntime has no CUDA provider or `tensorrt` is not
installed. Without a CUDA device nothing runs: one line, exit 0. Writes one JSON report (default
work/gpu_check.json); exit 1 when a step that ran failed. --budget-s bounds the whole run: a step
that would start with too little time left is skipped and says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from medoe.cli import parse_hw  # noqa: E402  (torch-free; after the path above)
from medoe.contract import IMAGES  # noqa: E402

NO_CUDA = "no CUDA device: GPU check skipped"
ARCH_CONFIG = "deeplabv3plus_r50c_cityscapes"
TRAIN_CONFIG = "deeplabv3plus_tiny_synthetic_cpu"


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="work/gpu_check.json", help="the JSON report")
    parser.add_argument("--size", type=parse_hw, default=(512, 1024), metavar="HxW", help="of the latency checks")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per latency, after 3 warm-ups")
    parser.add_argument("--train-iters", type=int, default=20, help="stage-1 AMP iterations")
    parser.add_argument("--budget-s", type=float, default=540, help="the whole run's time limit")
    return parser.parse_args(argv)


# --- the report: plain functions of the measurements, testable without a GPU -------------------


def build_report(steps: dict[str, dict], environment: dict, seconds: float, argv: list[str]) -> dict:
    """One JSON object: where it ran, every step's status and numbers, and whether all that ran passed."""
    failed = [name for name, step in steps.items() if step.get("status") == "failed"]
    return {
        "check": "scripts/gpu_check.py",
        "command": " ".join(["python", "scripts/gpu_check.py", *argv]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment,
        "steps": steps,
        "skipped": [name for name, step in steps.items() if step.get("status") == "skipped"],
        "failed": failed,
        "ok": not failed,
        "total_seconds": round(seconds, 1),
    }


def summary(report: dict) -> list[str]:
    """One line per step: status, then its headline numbers or its reason."""
    lines = []
    for name, step in report["steps"].items():
        status = step.get("status", "?")
        if status != "ok":
            lines.append(f"{name}: {status} ({step.get('reason', 'no reason given')})")
            continue
        numbers = {k: v for k, v in step.items() if k.endswith(("_ms", "_s", "_mib", "agreement")) and v is not None}
        lines.append(f"{name}: ok " + ", ".join(f"{k} {v}" for k, v in numbers.items()))
    lines.append(f"report: {'all steps that ran passed' if report['ok'] else 'FAILED: ' + ', '.join(report['failed'])}")
    return lines


def write_report(path: str | Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# --- the steps ----------------------------------------------------------------------------------


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def failed(reason: str, **extra) -> dict:
    return {"status": "failed", "reason": reason, **extra}


def median_ms(fn, repeats: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - tic)
    times.sort()
    return round(1000 * times[len(times) // 2], 2)


def step_training(args, work: Path, timeout: float) -> dict:
    from medoe.config import load_config

    config = load_config(TRAIN_CONFIG).replace(
        amp=True, synthetic_train_images=64, synthetic_val_images=8, iters=args.train_iters, stage2_iters=4
    )
    config_path = work / "train_config.json"
    config.save(config_path)
    command = [sys.executable, "-m", "training.train", "--config", str(config_path), "--device", "cuda"]
    command += ["--work-dir", str(work / "train"), "--no-eval", "--save-every", "1000", "--workers", "2"]
    tic = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return failed(f"training did not finish within {timeout:.0f} s")
    seconds = time.perf_counter() - tic
    if done.returncode != 0:
        return failed(f"training.train exited {done.returncode}", tail=(done.stdout + done.stderr)[-2000:])
    log = [json.loads(line) for line in (work / "train" / "log.jsonl").read_text().splitlines() if line.strip()]
    stage1 = [r for r in log if r["stage"] == 1]
    losses = [r["loss"] for r in log]
    if len(stage1) != args.train_iters or not all(math.isfinite(v) for v in losses):
        return failed(f"expected {args.train_iters} stage-1 iterations with finite losses", losses=losses)
    speed = [r["images_per_s"] for r in stage1[3:]] or [r["images_per_s"] for r in stage1]
    return {
        "status": "ok",
        "config": f"{TRAIN_CONFIG} with amp, 64 training images",
        "stage1_iterations": len(stage1),
        "stage2_iterations": len(log) - len(stage1),
        "first_loss": round(stage1[0]["loss"], 4),
        "last_stage1_loss": round(stage1[-1]["loss"], 4),
        "images_per_s_median": round(sorted(speed)[len(speed) // 2], 1),
        "wall_s": round(seconds, 1),
    }


def fused_graph():
    """ExportGraph of DeepLabv3+ MEDOE R50c with random weights (the inference benchmark's model), on the CPU."""
    from bench.inference_probe import random_model
    from export.graph import build_graph
    from medoe.config import load_config

    return build_graph(random_model(load_config(ARCH_CONFIG).network, "medoe"))


def step_eager(graph, images, repeats: int, labels: dict) -> dict:
    """fp32, TF32 and fp16-autocast latency of the fused graph; each mode's labels go into `labels`."""
    import copy

    import numpy as np
    import torch

    model = copy.deepcopy(graph).cuda().eval()
    torch.backends.cudnn.benchmark = True
    device_images = torch.from_numpy(images).cuda()
    result = {"status": "ok", "model": f"{ARCH_CONFIG} MEDOE, random weights"}
    modes = {"fp32": (False, False), "tf32": (True, False), "fp16_autocast": (True, True)}
    for mode, (tf32, half) in modes.items():
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32

        @torch.inference_mode()
        def on_device(x=device_images, half=half):
            with torch.autocast("cuda", dtype=torch.float16, enabled=half):
                return model(x)

        def host_to_host(half=half):
            return [v.cpu().numpy() for v in on_device(torch.from_numpy(images).cuda(), half)]

        torch.cuda.reset_peak_memory_stats()
        result[f"{mode}_device_ms"] = median_ms(on_device, repeats, torch.cuda.synchronize)
        result[f"{mode}_host_ms"] = median_ms(host_to_host, repeats, torch.cuda.synchronize)
        result[f"{mode}_peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        labels[mode] = host_to_host()[0]
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
    for mode in ("tf32", "fp16_autocast"):
        result[f"{mode}_label_agreement"] = round(float(np.mean(labels[mode] == labels["fp32"])), 5)
    result["fp16_speedup_over_fp32"] = round(result["fp32_device_ms"] / result["fp16_autocast_device_ms"], 3)
    return result


def step_export(graph, path: Path) -> dict:
    from export.exporter import export_onnx
    from export.graph import graph_metadata

    tic = time.perf_counter()
    data = export_onnx(graph, graph_metadata(graph.model, None, graph.outputs)).model.SerializeToString()
    path.write_bytes(data)
    return {"status": "ok", "export_s": round(time.perf_counter() - tic, 1), "onnx_mib": round(len(data) / 2**20, 1)}


def step_onnxruntime_cuda(onnx_path: Path, images, reference, repeats: int) -> dict:
    import numpy as np
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return skipped(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (pip install onnxruntime-gpu)")
    tic = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = [("CUDAExecutionProvider", {"cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
    session = ort.InferenceSession(str(onnx_path), options, providers=providers)
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return failed(f"the session fell back to {session.get_providers()} (CUDA or cuDNN libraries not found?)")
    load_s = time.perf_counter() - tic
    run = lambda: session.run(None, {IMAGES: images})  # noqa: E731
    labels = run()[0]
    return {
        "status": "ok",
        "onnxruntime": ort.__version__,
        "session_s": round(load_s, 1),
        "host_ms": median_ms(run, repeats, lambda: None),
        "fp32_label_agreement": round(float(np.mean(labels == reference)), 5),
    }


def step_tensorrt(onnx_path: Path, work: Path, images, reference, repeats: int, timeout: float) -> dict:
    import numpy as np

    if importlib.util.find_spec("tensorrt") is None:
        return skipped("the tensorrt package is not installed (pip install tensorrt)")
    h, w = images.shape[1:3]
    shape = f"1x{h}x{w}x3"
    plan = work / "medoe.plan"
    command = [sys.executable, str(ROOT / "export" / "to_trt.py"), "--onnx", str(onnx_path), "--out", str(plan)]
    command += ["--fp16", "--min-shape", shape, "--opt-shape", shape, "--max-shape", shape, "--no-triton-config"]
    tic = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return failed(f"export/to_trt.py did not finish within {timeout:.0f} s")
    if done.returncode != 0:
        return failed(f"export/to_trt.py exited {done.returncode}", tail=(done.stdout + done.stderr)[-2000:])
    build_s = time.perf_counter() - tic
    from export.to_trt import EngineRunner, load_tensorrt

    trt = load_tensorrt()
    engine = EngineRunner(trt, plan.read_bytes())
    labels = engine(images)["labels"]
    return {
        "status": "ok",
        "tensorrt": trt.__version__,
        "precision": "fp16",
        "build_and_check_s": round(build_s, 1),
        "to_trt_output": done.stdout.strip().splitlines()[-12:],
        "host_ms": median_ms(lambda: engine(images), repeats, lambda: None),
        "fp32_label_agreement": round(float(np.mean(labels == reference)), 5),
    }


def ort_has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def environment() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "gpu": torch.cuda.get_device_name(0),
        "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        "cpu_cores": os.cpu_count(),
    }
    for package in ("onnxruntime", "tensorrt"):
        try:
            info[package] = __import__(package).__version__
        except Exception:  # absent or unloadable: the step says why
            info[package] = None
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    started = time.perf_counter()
    deadline = started + args.budget_s
    height, width = args.size
    steps: dict[str, dict] = {}

    def left() -> float:
        return deadline - time.perf_counter()

    def record(name: str, step: dict) -> None:
        steps[name] = step
        print(summary({"steps": {name: step}, "ok": True, "failed": []})[0], flush=True)

    def run(name: str, need_s: float, fn) -> None:
        if left() < need_s:
            record(name, skipped(f"only {left():.0f} s of --budget-s left, this step needs about {need_s:.0f} s"))
            return
        try:
            record(name, fn())
        except Exception as err:  # one step's failure must not hide the others' results
            record(name, failed(f"{type(err).__name__}: {err}"))

    with tempfile.TemporaryDirectory(prefix="medoe-gpu-check-") as tmp:
        work = Path(tmp)
        run("training", 60, lambda: step_training(args, work, max(30.0, min(240.0, left() - 200))))
        from export.graph import random_images

        graph, images, labels = fused_graph(), random_images(1, height, width, seed=0), {}
        run("eager", 30, lambda: step_eager(graph, images, args.repeats, labels))
        onnx_path = work / "medoe_r50c.onnx"
        later = ("onnxruntime_cuda", "tensorrt")
        if "fp32" not in labels:
            for name in later:
                record(name, skipped("needs the eager step's fp32 labels; it did not finish"))
        else:
            if ort_has_cuda() or importlib.util.find_spec("tensorrt") is not None:
                run("export", 60, lambda: step_export(graph, onnx_path))
            if steps.get("export", {}).get("status", "ok") != "ok":
                for name in later:
                    record(name, skipped("needs the exported graph; the export step did not finish"))
            else:
                reference = labels["fp32"]
                run("onnxruntime_cuda", 30, lambda: step_onnxruntime_cuda(onnx_path, images, reference, args.repeats))
                run(
                    "tensorrt", 90, lambda: step_tensorrt(onnx_path, work, images, reference, args.repeats, left() - 30)
                )
    report = build_report(steps, environment(), time.perf_counter() - started, argv)
    path = write_report(args.out, report)
    print(summary(report)[-1] + f"; written to {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
