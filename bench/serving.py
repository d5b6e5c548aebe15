"""Serving benchmark: one MEDOE graph in-process and through Triton, side by side in one run.

    python -m bench.serving                       # shipped model_repository, 512x1024, concurrency 1 4 8

Runs, each at every concurrency on the same synthetic 512x1024 street scenes:
PyTorch eager (the export graph, random weights of the same architecture unless --checkpoint),
in-process onnxruntime (the repository's model.onnx, the session settings the server uses),
Triton `medoe` with raw uint8 tensors over HTTP and gRPC (binary data; and with system shared
memory, since client and server share this host), and the `segment` ensemble with JPEG bytes.
Every request asks for the same outputs (labels, confidence, expert_weights); the first
answer of each client thread is checked against onnxruntime. A client thread per
concurrency slot sends its next request when the previous one returns.
Writes docs/benchmark_serving.md and .json (SPEC §10), with Triton's per-model statistics.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from bench import report as reporting
from bench import serving_callers as clients
from medoe.cli import CliParser, parse_hw
from medoe.contract import DEFAULT_OUTPUTS, ENSEMBLE, MODEL, POSTPROCESS, PREPROCESS
from serving.decode import decode_image

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = DEFAULT_OUTPUTS
RUNS = (
    "pytorch",
    "onnxruntime",
    "medoe_http",
    "medoe_grpc",
    "medoe_http_shm",
    "medoe_grpc_shm",
    "segment_http",
    "segment_grpc",
)
MODELS = (ENSEMBLE, PREPROCESS, MODEL, POSTPROCESS)


def get_args(argv=None):
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", default=str(ROOT / "model_repository"), help="Triton model repository to serve")
    parser.add_argument(
        "--config",
        default="deeplabv3plus_tiny_synthetic_cpu",
        help="config of the PyTorch model (must match the repository's medoe architecture)",
    )
    parser.add_argument("--checkpoint", help="PyTorch weights (default: random weights; the speed is the same)")
    parser.add_argument("--size", type=parse_hw, default=(512, 1024), metavar="HxW", help="image size")
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8], help="client threads in flight")
    parser.add_argument("--requests", type=int, default=48, help="timed requests per run and concurrency")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS), help="subset of runs")
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count(), help="torch.set_num_threads for eager")
    parser.add_argument("--out-dir", default=str(reporting.DOCS_DIR), help="where benchmark_serving.{md,json} go")
    return parser.parse_args(argv)


def scenes(count: int, height: int, width: int) -> tuple[np.ndarray, list[bytes]]:
    """Synthetic street scenes (held-out split) as uint8 RGB and as JPEG bytes (quality 90)."""
    from medoe.data.synthetic import SyntheticStreets

    data = SyntheticStreets(count, height, width, seed=0, split="test")
    images = np.stack([data.load(i)[0] for i in range(count)]).astype(np.uint8)
    jpegs = [
        cv2.imencode(".jpg", cv2.cvtColor(im, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        for im in images
    ]
    return images, jpegs


def drive(make_caller, concurrency: int, requests: int, count: int) -> dict:
    """`concurrency` threads, each with its own caller, share `requests` timed calls after one
    untimed call each (connection set-up, answer check). Returns throughput and latency."""
    latencies: list[float] = []
    errors: list[str] = []
    lock, next_index = threading.Lock(), [0]
    ready = threading.Barrier(concurrency + 1)

    def worker(slot: int) -> None:
        call = None
        try:
            call = make_caller(slot)
            call(slot % count, True)
            ready.wait()
            loop(call)
        except threading.BrokenBarrierError:
            pass
        except Exception as err:  # reported below, the run fails
            errors.append(f"{type(err).__name__}: {err}")
            ready.abort()
        finally:
            getattr(call, "close", lambda: None)()

    def loop(call) -> None:
        while True:
            with lock:
                index = next_index[0]
                next_index[0] += 1
            if index >= requests:
                break
            tic = time.perf_counter()
            call(index % count, False)
            with lock:
                latencies.append(time.perf_counter() - tic)

    threads = [threading.Thread(target=worker, args=(slot,)) for slot in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        pass
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(errors[0])
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(latencies),
        "images_per_s": round(len(latencies) / wall, 3),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p95_ms": round(float(np.percentile(ms, 95)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


def stats_delta(before: dict, after: dict) -> dict:
    """Per model: requests, executions (average batch) and mean ms per request in each phase."""
    table = {}
    for model, end in after.items():
        start = before.get(model, {})
        delta = {k: end[k] - start.get(k, 0) for k in end}
        n = max(delta["success_count"], 1)
        table[model] = {
            "requests": delta["success_count"],
            "avg_batch": round(delta["inference_count"] / max(delta["execution_count"], 1), 2),
            **{
                f"{phase}_ms": round(delta[f"{phase}_ns"] / n / 1e6, 2)
                for phase in ("queue", "compute_input", "compute_infer", "compute_output")
            },
        }
    return table


def main(argv=None) -> int:
    args = get_args(argv)
    if min(args.concurrency) < 1 or args.requests < 1:
        print("error: --concurrency and --requests must be positive", file=sys.stderr)
        return 2
    onnx_path = Path(args.repository) / MODEL / "1" / "model.onnx"
    if not onnx_path.is_file():
        print(f"error: no ONNX graph at {onnx_path}", file=sys.stderr)
        return 2
    started, load_before = time.perf_counter(), os.getloadavg()
    height, width = args.size
    images, jpegs = scenes(max(args.concurrency), height, width)
    references = clients.reference_labels(onnx_path, images, jpegs)
    decode_ms = float(np.median([timed(lambda j=j: decode_image(j)) for j in jpegs * 3])) * 1000
    server = None
    results: dict[str, dict[int, dict]] = {run: {} for run in args.runs}
    triton_stats: dict[str, dict[int, dict]] = {}
    try:
        if any(run.startswith(("medoe_", "segment_")) for run in args.runs):
            from serving.processes import free_ports
            from serving.supervisor import start_server

            server = start_server(args.repository, *free_ports(3), timeout=300)
        for concurrency in args.concurrency:
            for run in args.runs:
                make_caller = clients.caller_factory(run, args, server, images, jpegs, references, OUTPUTS)
                before = (
                    clients.model_stats(server, MODELS) if server and run not in ("pytorch", "onnxruntime") else None
                )
                results[run][concurrency] = drive(make_caller, concurrency, args.requests, len(images))
                if before is not None:
                    triton_stats.setdefault(run, {})[concurrency] = stats_delta(
                        before, clients.model_stats(server, MODELS)
                    )
                r = results[run][concurrency]
                print(
                    f"c{concurrency} {run:<15} {r['images_per_s']:6.2f} images/s  p50 {r['p50_ms']:7.1f}  "
                    f"p95 {r['p95_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms",
                    flush=True,
                )
    except (RuntimeError, OSError, ValueError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    finally:
        if server:
            server.stop()
    report = build_report(args, argv, results, triton_stats, decode_ms, started, load_before)
    reporting.write_report(Path(args.out_dir), "benchmark_serving", report, markdown(report))
    print("\n".join(reporting.goals_markdown(report["goals"])))
    return 0


def timed(fn) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def build_report(args, argv, results, triton_stats, decode_ms, started, load_before) -> dict:
    ratios, goals = {}, []
    for c in args.concurrency:
        base = results.get("onnxruntime", {}).get(c)
        for run in args.runs:
            if base and run != "onnxruntime":
                ratios[f"{run}_over_onnxruntime_throughput_c{c}"] = round(
                    results[run][c]["images_per_s"] / base["images_per_s"], 3
                )
    for run, target in (("medoe_grpc_shm", 0.85), ("medoe_http_shm", 0.75), ("medoe_grpc", 0.85), ("medoe_http", 0.75)):
        key = f"{run}_over_onnxruntime_throughput_c4"
        if key in ratios and (run.endswith("_shm") or f"{run}_shm" not in args.runs):
            goals.append(reporting.goal(key, ratios[key], target, ">="))
    first = args.concurrency[0]
    for protocol in ("grpc", "http"):
        bare, ensemble = (
            results.get(f"medoe_{protocol}", {}).get(first),
            results.get(f"segment_{protocol}", {}).get(first),
        )
        if bare and ensemble:
            key = f"segment_{protocol}_p50_over_medoe_p50_plus_decode_c{first}"
            ratios[key] = round(ensemble["p50_ms"] / (bare["p50_ms"] + decode_ms), 3)
            goals.append(reporting.goal(key, ratios[key], 1.15, "<="))
    import onnxruntime
    import torch

    return {
        **reporting.provenance("bench.serving", argv),
        "settings": {
            "size": list(args.size),
            "concurrency": args.concurrency,
            "requests": args.requests,
            "repository": str(args.repository),
            "pytorch_weights": args.checkpoint or "random (same architecture)",
            "torch_threads": args.torch_threads,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "jpeg_decode_ms": round(decode_ms, 2),
            "outputs": list(OUTPUTS),
            "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        },
        "results": results,
        "ratios": ratios,
        "triton_model_stats": triton_stats,
        "total_seconds": round(time.perf_counter() - started, 1),
        "goals": goals,
    }


def markdown(report: dict) -> list[str]:
    s = report["settings"]
    lines = reporting.header_markdown("Serving benchmark: in-process vs Triton", report)
    lines += [
        f"{s['size'][0]}x{s['size'][1]} synthetic street scenes, {s['requests']} timed requests per cell, "
        f"outputs {', '.join(s['outputs'])}; JPEG decode alone {s['jpeg_decode_ms']} ms. Throughput in images/s, "
        'latency in ms; "vs ORT" is throughput over in-process onnxruntime at the same concurrency.',
        "",
    ]
    lines += ["| run | concurrency | images/s | p50 | p95 | p99 | vs ORT |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in s["concurrency"]:
        for run, by_c in report["results"].items():
            r = by_c[c]
            ratio = report["ratios"].get(f"{run}_over_onnxruntime_throughput_c{c}", 1.0 if run == "onnxruntime" else "")
            lines.append(
                f"| {run} | {c} | {r['images_per_s']} | {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {ratio} |"
            )
    lines += [
        "",
        "## Goals",
        "",
        *reporting.goals_markdown(report["goals"]),
        "",
        "## Where Triton's time goes",
        "",
        "Triton's per-model statistics over each run (timed requests plus each client thread's untimed first one), "
        "mean ms per request.",
        "",
        "| run | c | model | requests | avg batch | queue | compute input | compute infer | compute output |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run, by_c in report["triton_model_stats"].items():
        for c, models in by_c.items():
            for model, m in models.items():
                if m["requests"]:
                    lines.append(
                        f"| {run} | {c} | {model} | {m['requests']} | {m['avg_batch']} | {m['queue_ms']} | "
                        f"{m['compute_input_ms']} | {m['compute_infer_ms']} | {m['compute_output_ms']} |"
                    )
    return lines


if __name__ == "__main__":
    sys.exit(main())
