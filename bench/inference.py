"""Inference benchmark of the fused graph: PyTorch eager vs onnxruntime, MEDOE (K=3) vs the baseline.

    python -m bench.inference                                  # tiny backbone, random weights, ~1 min on 2 cores
    python -m bench.inference --checkpoint work/run/final --baseline-checkpoint work/base/final
    python -m bench.inference --real-size                      # + ResNet-50c rows and the scaling plot, ~12 min

Both runtimes execute the same graph (uint8 NHWC in; labels, confidence, expert weights out)
with the same thread count, timed in blocks ordered A B B A so drifting background load
hits both alike.
`--real-size` (opt-in, bench/inference_scale.py): DeepLabv3+, PSPNet, OCR on ResNet-50c at 512x1024
(GFLOP, GFLOP/s against the GEMM roof, peak memory) and how onnxruntime MEDOE DeepLabv3+ grows
with image size and batch. About 11 min on 2 idle cores (estimated, not run whole: from the issue's
~7 s onnxruntime / ~10 s eager per image of MEDOE R50c and a measured 10 s export + parity):
the 6 models ~6.5 min (export, then 1 + 3 runs per runtime), the scaling points ~3 min (1024x2048
alone ~2), GEMM roof and profiles ~1.5 min. On shared cores (load 3-4) one image took twice as
long (12.9 s onnxruntime, 22 s eager), so expect ~25 min there.
Writes docs/benchmark_inference.md and .json (SPEC §10), with --real-size also
docs/benchmark_inference_scaling.png.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

if __package__ in (None, ""):  # run as `python bench/inference.py`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import inference_scale as real_size
from bench import report as reporting
from bench.inference_probe import random_model
from bench.inference_scale import export_checked, profile_ops
from export.graph import build_graph, random_images, run_torch
from export.parity import run_onnxruntime
from medoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medoe.cli import CliParser, parse_hw
from medoe.config import load_config
from medoe.model import count_parameters

MODELS = ("medoe", "baseline")


def get_args(argv=None):
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="deeplabv3plus_tiny_synthetic_cpu", help="config for the on-the-fly models")
    parser.add_argument("--checkpoint", help="MEDOE checkpoint (default: random weights from --config)")
    parser.add_argument("--baseline-checkpoint", help="baseline checkpoint (default: random weights from --config)")
    parser.add_argument("--size", type=parse_hw, default=(512, 1024), metavar="HxW")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and ORT intra_op threads")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per runtime, model and batch")
    parser.add_argument("--out-dir", default=str(reporting.DOCS_DIR), help="where benchmark_inference.{md,json} go")
    real_size.add_arguments(parser)
    return parser.parse_args(argv)


def load_models(args, work: Path) -> dict:
    """MEDOE and baseline checkpoints; made here with random weights when not given."""
    paths = {"medoe": args.checkpoint, "baseline": args.baseline_checkpoint}
    config = load_config(args.config)
    loaded = {}
    for name in MODELS:
        if paths[name] is None:
            paths[name] = save_checkpoint(work / name, random_model(config.network, name))
        loaded[name] = load_checkpoint(paths[name])
    if loaded["medoe"].config.model != "medoe" or loaded["baseline"].config.model == "medoe":
        raise CheckpointError("--checkpoint must be a MEDOE checkpoint and --baseline-checkpoint a single-decoder one")
    if loaded["medoe"].config.backbone != loaded["baseline"].config.backbone:
        raise CheckpointError("MEDOE and the baseline must share the backbone for a fair comparison")
    return {n: (c, str(paths[n])) for n, c in loaded.items()}


def time_pair(graph, sess, images: np.ndarray, repeats: int) -> dict[str, float]:
    """Median seconds per call of each runtime: warm-up, then blocks in the order A B B A."""
    runs = {
        "pytorch": lambda: run_torch(graph, images),
        "onnxruntime": lambda: run_onnxruntime(sess, images, graph.outputs),
    }
    seconds = defaultdict(list)
    for fn in runs.values():
        fn()
    # Blocks, not alternate runs: both runtimes' worker threads spin for a while after a run
    # and on 2 cores would slow the other's next run. A B B A evens out drifting background load.
    for name in [*runs, *reversed(runs)]:
        time.sleep(0.2)
        for _ in range(max(1, repeats // 2)):
            tic = time.perf_counter()
            runs[name]()
            seconds[name].append(time.perf_counter() - tic)
    return {name: float(np.median(values)) for name, values in seconds.items()}


def main(argv=None) -> int:
    args = get_args(argv)
    problem = real_size.check_arguments(args)
    if args.threads < 1 or args.repeats < 1 or min(args.batches) < 1:
        problem = "--threads, --repeats and --batches must be positive"
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    height, width = args.size
    results, params, sources, profiles, section = [], {}, {}, {}, None
    with tempfile.TemporaryDirectory(prefix="medoe-bench-") as tmp:
        work = Path(tmp)
        try:
            models = load_models(args, work)
        except (CheckpointError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for name, (checkpoint, source) in models.items():
            graph = build_graph(checkpoint.model)
            # The graph being timed is the verified one: quick parity at an odd size first.
            data, sess, failures = export_checked(graph, args.threads)
            if failures:
                print(f"error: {name}: onnxruntime and PyTorch disagree: {'; '.join(failures)}", file=sys.stderr)
                return 1
            params[name], sources[name] = count_parameters(checkpoint.model), source
            for batch in args.batches:
                images = random_images(batch, height, width, seed=batch)
                for runtime, seconds in time_pair(graph, sess, images, args.repeats).items():
                    results.append(
                        {
                            "model": name,
                            "runtime": runtime,
                            "batch": batch,
                            "latency_ms": round(seconds * 1000, 2),
                            "images_per_s": round(batch / seconds, 3),
                        }
                    )
                    print(
                        f"{name:<8} {runtime:<11} batch {batch}: {seconds * 1000:8.1f} ms, {batch / seconds:6.2f} "
                        "images/s"
                    )
            profiles[name] = profile_ops(
                data, args.threads, random_images(1, height, width, seed=1), graph.outputs, work
            )
            del graph, sess, data
        if args.real_size:
            try:
                section = real_size.run(args, work)
            except RuntimeError as err:
                print(f"error: {err}", file=sys.stderr)
                return 1
    config = models["medoe"][0].config

    def find(model, runtime, batch):
        return next(r for r in results if r["model"] == model and r["runtime"] == runtime and r["batch"] == batch)

    ratios = {}
    for batch in args.batches:
        for n in MODELS:
            ratios[f"onnxruntime_over_pytorch_throughput_{n}_b{batch}"] = (
                find(n, "onnxruntime", batch)["images_per_s"] / find(n, "pytorch", batch)["images_per_s"]
            )
        for runtime in ("onnxruntime", "pytorch"):
            ratios[f"medoe_over_baseline_latency_{runtime}_b{batch}"] = (
                find("medoe", runtime, batch)["latency_ms"] / find("baseline", runtime, batch)["latency_ms"]
            )
    ratios = {k: round(v, 3) for k, v in ratios.items()}
    targets = {f"onnxruntime_over_pytorch_throughput_medoe_b{b}": (1.3, ">=") for b in args.batches}
    targets[f"medoe_over_baseline_latency_onnxruntime_b{args.batches[0]}"] = (1.25, "<=")
    goals = [reporting.goal(name, ratios[name], *target) for name, target in targets.items()]
    report = {
        **reporting.provenance("bench.inference", argv),
        "settings": {
            "size": [height, width],
            "batches": args.batches,
            "threads": args.threads,
            "repeats": args.repeats,
            "onnxruntime": ort.__version__,
            "torch": torch.__version__,
            "statistic": "median latency",
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "models": {
            n: {
                "checkpoint": sources[n]
                if (args.checkpoint if n == "medoe" else args.baseline_checkpoint)
                else "random weights (made on the fly)",
                "parameters": params[n],
            }
            for n in MODELS
        },
        "config": config.to_dict(),
        "results": results,
        "ratios": ratios,
        "parameter_overhead": round(params["medoe"] / params["baseline"] - 1, 4),
        "onnxruntime_profile_b1": profiles,
        **({"real_size": section} if section else {}),
        "total_seconds": round(time.perf_counter() - started, 1),
        "goals": goals + (section["goals"] if section else []),
    }
    reporting.write_report(Path(args.out_dir), "benchmark_inference", report, markdown(report, args))
    print("\n".join(reporting.goals_markdown(report["goals"])))
    return 0


def markdown(report: dict, args) -> list[str]:
    s, config = report["settings"], report["config"]
    random_models = all("random" in m["checkpoint"] for m in report["models"].values())
    section = report.get("real_size")
    real_goals = {g["name"] for g in section["goals"]} if section else set()
    goals = [g for g in report["goals"] if g["name"] not in real_goals]  # the tiny rows' goals
    lines = reporting.header_markdown(
        "Inference benchmark: fused ONNX graph, PyTorch eager vs onnxruntime, MEDOE vs baseline", report
    )
    lines += [
        f"Backbone `{config['backbone']}`, context `{config['context']}`, {config['num_classes']} classes, decoder "
        "width "
        f"{config['decoder_channels']}; MEDOE with K={config['num_experts']} experts"
        + (" (experts 2..K light)" if config["light_experts"] else "")
        + ", baseline with the same backbone and context. "
        + (
            "Both models have random weights: checkpoints made on the fly with `build_model` + `save_checkpoint` "
            "(timing does not depend on the weights' values). "
            if random_models
            else ""
        )
        + f"Input: random uint8 {s['size'][0]}x{s['size'][1]} RGB images; both runtimes run the same graph "
        f"(uint8 NHWC in, labels + confidence (+ expert weights) out, argmax and resize inside). "
        f"Threads: `torch.set_num_threads({s['threads']})` and onnxruntime `intra_op_num_threads={s['threads']}`, "
        f"`inter_op_num_threads=1`, all graph optimisations (onnxruntime {s['onnxruntime']}, torch {s['torch']}). "
        f"Median of {s['repeats']} runs after one warm-up, in blocks ordered PyTorch, onnxruntime, onnxruntime, "
        "PyTorch. "
        f"Load average (1 min) before/after: {s['load_average_before_after'][0]} / {s['load_average_before_after'][1]} "
        "(after includes this run's own threads).",
        "",
        "| model | runtime | batch | latency (ms) | images/s |",
        "|---|---|---:|---:|---:|",
        *[
            f"| {r['model']} | {r['runtime']} | {r['batch']} | {r['latency_ms']:.1f} | {r['images_per_s']:.2f} |"
            for r in report["results"]
        ],
        "",
        "| ratio | value |",
        "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()],
        "",
        f"Parameters: MEDOE {report['models']['medoe']['parameters']:,}, baseline "
        f"{report['models']['baseline']['parameters']:,} "
        f"(MEDOE +{100 * report['parameter_overhead']:.1f}%: the K-1 light experts and the decision maker).",
        "",
        *reporting.goals_markdown(goals),
        "",
        "## Where the time goes (onnxruntime profiler, batch 1, ms per run by op type)",
        "",
        "| op type | MEDOE | baseline |",
        "|---|---:|---:|",
    ]
    profile = report["onnxruntime_profile_b1"]
    ops = list(dict.fromkeys([*profile["medoe"]["ops_ms"], *profile["baseline"]["ops_ms"]]))[:10]
    lines += [
        f"| {op} | {profile['medoe']['ops_ms'].get(op, 0):.1f} | {profile['baseline']['ops_ms'].get(op, 0):.1f} |"
        for op in ops
    ]
    lines += [f"| all nodes | {profile['medoe']['total_ms']:.1f} | {profile['baseline']['total_ms']:.1f} |", ""]
    extra = {
        op: profile["medoe"]["ops_ms"].get(op, 0) - profile["baseline"]["ops_ms"].get(op, 0)
        for op in {*profile["medoe"]["ops_ms"], *profile["baseline"]["ops_ms"]}
    }
    top = sorted(extra.items(), key=lambda kv: -kv[1])[:4]
    lines += [
        "MEDOE's extra time over the baseline by op type: "
        + ", ".join(f"{op} {ms:+.1f} ms" for op, ms in top)
        + ". The K-1 light experts and the decision maker run as Conv/FusedConv; the K expert softmaxes and "
        "the selection softmax (decomposed by export/to_onnx.py) as ReduceMax/Sub/Exp/ReduceSum/Div.",
        "",
    ]
    missed = [g for g in goals if not g["met"]]
    if missed:
        lines += [
            "Goals missed: " + ", ".join(g["name"] for g in missed) + ". The profile above says where the time goes; "
            "the JSON file has the full per-op breakdown (`onnxruntime_profile_b1`).",
            "",
        ]
    if s["load_average_before_after"][0] > 0.5:  # "after" includes this run's own threads
        lines += [
            f"**The machine was shared during this run (load average {s['load_average_before_after'][0]} on "
            f"{report['machine']['logical_cores']} cores).** PyTorch's OpenMP threads slow down sharply when the cores "
            "are oversubscribed, far more than onnxruntime's thread pool, so the PyTorch numbers and the "
            "onnxruntime/PyTorch ratios overstate onnxruntime's lead; rerun on an idle machine.",
            "",
        ]
    lines += [*real_size.markdown(section), ""] if section else []
    lines.append(f"Total wall time {report['total_seconds']:.0f} s. Regenerate with `{report['command']}`.")
    return lines


if __name__ == "__main__":
    sys.exit(main())
