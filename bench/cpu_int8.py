"""CPU int8 benchmark: onnxruntime fp32 vs onnxruntime int8 (QDQ, export/quantize.py) vs OpenVINO, side by side.

    python -m bench.cpu_int8                  # both parts: ~15 min on the 2-core machine (estimated)
    python -m bench.cpu_int8 --skip-r50c      # the shipped model only, ~70 s (measured)
    python -m bench.cpu_int8 --skip-r50c --images 4 --repeats 2 --out-dir /tmp/x   # smoke test, ~30 s

Part 1, R50c scale (skipped by --skip-r50c): DeepLabv3+ MEDOE on resnet50c (the network of
`deeplabv3plus_r50c_cityscapes`, K=3, output stride 8) with random weights (speed does not depend
on them), exported with export_onnx, quantized on --calib-images synthetic train-split images,
then the same uint8 image (512x1024, batch 1) timed on every runtime. Estimated on the 2-core
machine from a 128x256 smoke run, not measured: export ~10 s, calibration (32 images at 256x512)
+ quantization ~2 min, OpenVINO compiles ~10 s, timing ~8 min at --repeats 10 (runs of ~14 s
fp32 and ~8 s int8, 11 per runtime), profiles ~1 min.
Part 2, the shipped model (`model_repository/medoe/1/model.onnx`, tiny backbone): its checkpoint is
not in the repository, so the shipped fp32 graph itself is re-quantized, calibrated on the
synthetic train split, and both graphs' labels are scored against the ground truth of the
synthetic `test` split (100 images; --images N takes the first N): mIoU fp32 vs int8. Its latency
at 512x1024 is timed too. 71 s at the defaults (measured on the shared 2-core machine).

Timing: every runtime gets one warm-up run, then blocks of repeats/2 runs in the order
A B C D D C B A (a drifting background load hits all alike); median. Writes
docs/benchmark_cpu_int8.{md,json} (SPEC §10) with the goals of issue 14 item 3.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

if __package__ in (None, ""):  # run as `python bench/cpu_int8.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import report as reporting
from bench.cpu_int8_report import markdown
from bench.inference_scale import profile_ops as op_profile
from export.calibration import CalibrationImages
from export.exporter import export_onnx
from export.graph import build_graph, graph_metadata, random_images
from export.quantize import quantize_int8
from medoe.cli import CliParser, parse_hw
from medoe.config import load_config
from medoe.contract import IMAGES, LABELS
from medoe.data.folder import export_folder_dataset
from medoe.metrics import ConfusionMatrix
from medoe.model import build_model, count_parameters
from serving.ort_memory import cpu_session
from training.common import Subset, get_dataset

SHIPPED = Path("model_repository/medoe/1/model.onnx")
SHIPPED_CONFIG = "deeplabv3plus_tiny_synthetic_cpu"
R50C_CONFIG = "deeplabv3plus_r50c_cityscapes"
GOAL_SPEEDUP, GOAL_MIOU_DROP = 1.5, 0.5  # issue 14 item 3: int8 >= 1.5x fp32 onnxruntime; mIoU drop <= 0.5


def get_args(argv=None):
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-r50c", action="store_true", help="only the shipped model (part 1 takes ~15 min)")
    parser.add_argument("--images", type=int, default=100, help="test-split images scored for mIoU (the split has 100)")
    parser.add_argument("--calib-images", type=int, default=32, help="train-split images calibration runs on")
    parser.add_argument("--calib-size", type=parse_hw, default=(256, 512), metavar="HxW", help="calibration crop")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per runtime (two blocks)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op and OpenVINO threads")
    parser.add_argument("--size", type=parse_hw, default=(512, 1024), metavar="HxW", help="timed image size")
    parser.add_argument("--shipped", default=str(SHIPPED), help="the shipped fp32 graph")
    parser.add_argument("--out-dir", default=str(reporting.DOCS_DIR), help="where benchmark_cpu_int8.{md,json} go")
    return parser.parse_args(argv)


# --- runtimes ----------------------------------------------------------------------------------


def openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.__version__


def openvino_model(path: Path, threads: int):
    """A CPU CompiledModel (f32 inference precision: no silent bf16 on CPUs that have it)."""
    import openvino

    core = openvino.Core()
    core.set_property(
        "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    )
    return core.compile_model(str(path), "CPU")


def make_runners(graphs: dict[str, Path], threads: int, notes: dict[str, str]) -> dict:
    """runtime name -> fn(images) -> {output name: array}; OpenVINO ones only where it installs and compiles."""
    runners = {}
    for precision, path in graphs.items():
        session = cpu_session(path, threads)
        names = [o.name for o in session.get_outputs()]
        runners[f"onnxruntime {precision}"] = lambda x, s=session, n=names: dict(
            zip(n, s.run(n, {IMAGES: x}), strict=True)
        )
    if openvino_version() is None:
        notes["openvino"] = "not installed (pip install openvino)"
        return runners
    for precision, path in graphs.items():
        try:
            compiled = openvino_model(path, threads)
        except Exception as err:  # a graph OpenVINO cannot read or compile: reported, not fatal
            notes[f"openvino {precision}"] = f"does not compile: {type(err).__name__}: {str(err).splitlines()[0]}"
            continue
        runners[f"openvino {precision}"] = lambda x, c=compiled: openvino_run(c, x)
    return runners


def openvino_run(compiled, images: np.ndarray) -> dict[str, np.ndarray]:
    result = compiled({IMAGES: images})
    return {port.get_any_name(): np.asarray(result[port]) for port in compiled.outputs}


def time_blocks(runners: dict, images: np.ndarray, repeats: int) -> dict[str, float]:
    """Median seconds per call, in blocks A B C D D C B A of repeats/2 runs (the caller has warmed each up)."""
    seconds = defaultdict(list)
    order = [*runners, *reversed(runners)]
    for name in order:
        time.sleep(0.2)  # the previous runtime's spinning worker threads settle
        for _ in range(max(1, repeats // 2)):
            tic = time.perf_counter()
            runners[name](images)
            seconds[name].append(time.perf_counter() - tic)
    return {name: float(np.median(values)) for name, values in seconds.items()}


def profile_ops(path: Path, threads: int, images: np.ndarray, runs: int, work: Path) -> dict:
    """onnxruntime's profiler: ms per run by op type (a warm-up run included in the mean), and
    int8 / Q-DQ / float totals."""
    profile = op_profile(path, threads, images, None, work, runs=runs + 1)
    kinds = {"int8 kernels": 0.0, "quantize/dequantize": 0.0, "float kernels": 0.0}
    for op, ms in profile["ops_ms"].items():
        kind = (
            "int8 kernels"
            if op.startswith(("QLinear", "QGemm")) or op in ("ConvInteger", "MatMulInteger")
            else "quantize/dequantize"
            if op in ("QuantizeLinear", "DequantizeLinear")
            else "float kernels"
        )
        kinds[kind] += ms
    return {**profile, "by_kind_ms": {k: round(v, 2) for k, v in kinds.items()}}


def agreement(reference: dict, candidate: dict) -> float:
    return float((reference[LABELS] == candidate[LABELS]).mean())


# --- the parts ---------------------------------------------------------------------------------


def write_calibration_dir(count: int, work: Path) -> Path:
    """The first `count` synthetic train-split images (the shipped recipe's data) as PNGs, for CalibrationImages."""
    train = get_dataset(load_config(SHIPPED_CONFIG), "train")
    export_folder_dataset(Subset(train, range(min(count, len(train)))), work / "calibration")
    return work / "calibration" / "img_dir" / "train"


def quantize_to(fp32: Path, calibration_dir: Path, args, out: Path) -> dict:
    tic = time.perf_counter()
    images = CalibrationImages(calibration_dir, (1, *args.calib_size, 3), limit=args.calib_images)
    quantized = quantize_int8(fp32, images)
    onnx.save(quantized.model, str(out))
    kept = quantized.float_nodes
    nodes = {n.name: n.op_type for n in quantized.model.graph.node}
    kept_ops = defaultdict(int)
    for name in kept:
        kept_ops[nodes.get(name, "?")] += 1
    return {
        "seconds": round(time.perf_counter() - tic, 1),
        "calibration_images": quantized.calibration_batches,
        "calibration_size": list(args.calib_size),
        "quantized_ops": quantized.quantized_ops,
        "float_nodes": len(kept),
        "float_ops": dict(sorted(kept_ops.items(), key=lambda kv: -kv[1])),
        "float_convs": [n for n in kept if nodes.get(n) == "Conv"],
        "size_mib": {"fp32": round(fp32.stat().st_size / 2**20, 2), "int8": round(out.stat().st_size / 2**20, 2)},
    }


def timing_part(graphs: dict[str, Path], args, work: Path, notes: dict) -> dict:
    runners = make_runners(graphs, args.threads, notes)
    images = random_images(1, *args.size, seed=0)
    outputs = {name: run(images) for name, run in runners.items()}  # also each runtime's warm-up run
    seconds = time_blocks(runners, images, args.repeats)
    reference = outputs["onnxruntime fp32"]
    return {
        "latency_ms": {k: round(1000 * v, 2) for k, v in seconds.items()},
        "speedup_over_onnxruntime_fp32": {k: round(seconds["onnxruntime fp32"] / v, 3) for k, v in seconds.items()},
        "label_agreement_with_onnxruntime_fp32": {k: round(agreement(reference, v), 5) for k, v in outputs.items()},
        "profile_b1": {p: profile_ops(path, args.threads, images, 2, work) for p, path in graphs.items()},
    }


def r50c_part(args, work: Path, calibration_dir: Path, notes: dict) -> dict:
    config = load_config(R50C_CONFIG).network
    torch.manual_seed(0)
    model = build_model(config).eval()
    c = config.num_classes
    model.set_groups([list(range(0, c // 3)), list(range(c // 3, 2 * c // 3)), list(range(2 * c // 3, c))])
    tic = time.perf_counter()
    graph = build_graph(model)
    fp32 = work / "r50c_fp32.onnx"
    onnx.save(export_onnx(graph, graph_metadata(model, None, graph.outputs)).model, str(fp32))
    export_s = time.perf_counter() - tic
    print(f"r50c: exported in {export_s:.0f} s ({count_parameters(model):,} parameters)", flush=True)
    quantization = quantize_to(fp32, calibration_dir, args, work / "r50c_int8.onnx")
    print(f"r50c: quantized in {quantization['seconds']:.0f} s", flush=True)
    result = timing_part({"fp32": fp32, "int8": work / "r50c_int8.onnx"}, args, work, notes)
    print(f"r50c: latency {result['latency_ms']} ms", flush=True)
    return {
        "network": config.to_dict(),
        "parameters": count_parameters(model),
        "weights": "random (torch.manual_seed(0)); speed does not depend on the values",
        "export_seconds": round(export_s, 1),
        "quantization": quantization,
        **result,
    }


def shipped_part(args, work: Path, calibration_dir: Path, notes: dict) -> dict:
    fp32 = Path(args.shipped)
    quantization = quantize_to(fp32, calibration_dir, args, work / "shipped_int8.onnx")
    graphs = {"fp32": fp32, "int8": work / "shipped_int8.onnx"}
    runners = make_runners(graphs, args.threads, notes)
    test = get_dataset(load_config(SHIPPED_CONFIG), "test")
    count = min(args.images, len(test))
    num_classes = len(test.class_names)
    matrices = {name: ConfusionMatrix(num_classes, test.ignore_index) for name in runners}
    agreed, pixels, max_conf = defaultdict(int), 0, defaultdict(float)
    for index in range(count):
        image, label = test.load(index)
        outputs = {name: run(image[None]) for name, run in runners.items()}
        reference = outputs["onnxruntime fp32"]
        pixels += label.size
        for name, values in outputs.items():
            matrices[name].update(values[LABELS][0], label)
            agreed[name] += int((values[LABELS] == reference[LABELS]).sum())
            max_conf[name] = max(max_conf[name], float(np.abs(values["confidence"] - reference["confidence"]).max()))
    scores = {}
    for name, matrix in matrices.items():
        metrics = matrix.compute()
        scores[name] = {
            "mIoU": round(100 * float(metrics.mIoU), 2),
            "mAcc": round(100 * float(metrics.mAcc), 2),
            "label_agreement_with_onnxruntime_fp32": round(agreed[name] / max(pixels, 1), 5),
            "max_abs_delta_confidence": round(max_conf[name], 4),
        }
    print(f"shipped: scored {count} test images: {scores}", flush=True)
    del runners
    timing = timing_part(graphs, args, work, notes)
    print(f"shipped: latency {timing['latency_ms']} ms", flush=True)
    return {
        "graph": str(fp32),
        "test_split": {"config": SHIPPED_CONFIG, "split": "test", "images": count, "of": len(test)},
        "quantization": quantization,
        "scores": scores,
        **timing,
    }


# --- report ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = get_args(argv)
    if min(args.images, args.calib_images, args.repeats, args.threads) < 1:
        print("error: --images, --calib-images, --repeats and --threads must be positive", file=sys.stderr)
        return 2
    if not Path(args.shipped).is_file():
        print(f"error: shipped graph not found: {args.shipped} (run from the repository root)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="medoe-int8-bench-") as tmp:
        work = Path(tmp)
        calibration_dir = write_calibration_dir(args.calib_images, work)
        shipped = shipped_part(args, work, calibration_dir, notes)
        r50c = None if args.skip_r50c else r50c_part(args, work, calibration_dir, notes)
    fp32, int8 = shipped["scores"]["onnxruntime fp32"], shipped["scores"]["onnxruntime int8"]
    goals = []
    if r50c is not None:
        goals.append(
            reporting.goal(
                "r50c_int8_over_fp32_onnxruntime_speedup_b1",
                r50c["speedup_over_onnxruntime_fp32"]["onnxruntime int8"],
                GOAL_SPEEDUP,
                ">=",
            )
        )
    goals.append(reporting.goal("shipped_int8_miou_drop_points", fp32["mIoU"] - int8["mIoU"], GOAL_MIOU_DROP, "<="))
    report = {
        **reporting.provenance("bench.cpu_int8", argv),
        "settings": {
            "size": list(args.size),
            "batch": 1,
            "threads": args.threads,
            "repeats": args.repeats,
            "calib_images": args.calib_images,
            "calib_size": list(args.calib_size),
            "onnxruntime": ort.__version__,
            "openvino": openvino_version(),
            "statistic": "median latency, blocks A B C D D C B A",
            "cpu_flags": cpu_flags(),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "r50c": r50c if r50c is not None else "skipped (--skip-r50c)",
        "shipped": shipped,
        "notes": notes,
        "total_seconds": round(time.perf_counter() - started, 1),
        "goals": goals,
    }
    reporting.write_report(Path(args.out_dir), "benchmark_cpu_int8", report, markdown(report))
    print("\n".join(reporting.goals_markdown(goals)))
    return 0


def cpu_flags() -> list[str]:
    """The int8-relevant x86 flags: without VNNI, int8 dot products take more instructions."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16")
    return [f for f in wanted if f in flags]


if __name__ == "__main__":
    sys.exit(main())
