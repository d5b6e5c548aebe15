"""Soak test: `segment` requests from N threads for minutes; failures, latency and server memory.

    python -m bench.soak --minutes 10 --concurrency 8                     # starts the server itself
    python -m bench.soak --minutes 10 --url 127.0.0.1:8000 --server-pid PID   # a running server

By default the embedded tritonserver (serving/supervisor.py) serves --model-repository on free
loopback ports. Every answer is checked: labels [H, W] at the image's size and equal to the first
answer for the same image (the model is deterministic); requests are not retried, every error
counts. Every --sample-seconds the RSS of tritonserver and all its descendants (the python-backend
stubs) is summed from /proc. Memory growth = median RSS of the last window / median RSS of the
first window after --warmup-seconds - 1. Goals: no failed request, growth <= 5%.
Before the clock starts, the largest batch this load can make is run twice straight on the model
`segment` calls (see `prime`), so that growth counts what keeps growing, not the arena filling up.
Writes <out-dir>/soak.{json,md}; exit 0 when every goal is met, 1 when not, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from bench import report as reporting
from medoe.cli import CliParser, parse_dims
from medoe.contract import DEFAULT_OUTPUTS, IMAGE, IMAGES, LABELS, MODEL, SEGMENT, SEGMENT_OUTPUTS, triton_parameters
from serving.processes import cmdline, descendants, stub_instance

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "serving" / "examples"
MIB = 1024 * 1024


def size(text: str) -> tuple[int, int]:
    return parse_dims(text, "HxW", "--size", minimum=8)  # type: ignore[return-value]


def get_args(argv=None) -> argparse.Namespace:
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8, help="client threads, one request in flight each")
    parser.add_argument(
        "--warmup-seconds", type=float, default=60.0, help="excluded from latency, throughput and growth"
    )
    parser.add_argument(
        "--window-seconds",
        type=float,
        help="RSS window for growth and timeline rows (default min(60, post-warm-up / 3))",
    )
    parser.add_argument("--sample-seconds", type=float, help="RSS sampling interval (default min(5, window / 5))")
    parser.add_argument(
        "--images",
        choices=("synthetic", "examples"),
        default="synthetic",
        help="synthetic street scenes (PNG and JPEG) at --size, or serving/examples/",
    )
    parser.add_argument("--size", type=size, default=(256, 512), help="HxW of the synthetic images")
    parser.add_argument("--num-images", type=int, default=8, help="distinct synthetic images")
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--url", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--server-pid", type=int, help="with --url: tritonserver's pid, for its memory")
    parser.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--out-dir", default=str(reporting.DOCS_DIR), help="where soak.json and soak.md go")
    args = parser.parse_args(argv)
    duration = args.minutes * 60
    if args.concurrency < 1 or args.num_images < 1 or duration <= args.warmup_seconds or args.warmup_seconds < 0:
        parser.error("need --concurrency >= 1, --num-images >= 1 and 0 <= --warmup-seconds < --minutes * 60")
    args.window_seconds = args.window_seconds or min(60.0, (duration - args.warmup_seconds) / 3)
    args.sample_seconds = args.sample_seconds or min(5.0, args.window_seconds / 5)
    if duration - args.warmup_seconds < 2 * args.window_seconds or args.window_seconds < 2 * args.sample_seconds:
        parser.error(
            f"{duration - args.warmup_seconds:.0f} s after warm-up must hold two --window-seconds "
            f"({args.window_seconds:.0f} s), each at least two --sample-seconds ({args.sample_seconds:.1f} s)"
        )
    if bool(args.url) != bool(args.server_pid):
        parser.error("--url and --server-pid go together (the soak measures that server's memory)")
    return args


def load_images(args) -> list[tuple[str, bytes, tuple[int, int]]]:
    """(name, encoded bytes, (H, W)) per image."""
    import cv2

    if args.images == "examples":
        paths = sorted(p for p in EXAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        return [(p.name, p.read_bytes(), cv2.imread(str(p)).shape[:2]) for p in paths]
    from medoe.data.synthetic import SyntheticStreets

    data = SyntheticStreets(args.num_images, *args.size, split="test")
    images = []
    for index in range(args.num_images):
        bgr = cv2.cvtColor(data.load(index)[0], cv2.COLOR_RGB2BGR)
        suffix = ".png" if index % 2 == 0 else ".jpg"  # both decoders in segment
        images.append((f"synthetic{index}{suffix}", cv2.imencode(suffix, bgr)[1].tobytes(), bgr.shape[:2]))
    return images


def tree_rss(pid: int) -> dict[str, int]:
    """RSS in bytes of `pid` and every descendant, by name (`tritonserver`, stubs by model instance)."""
    rss = {}
    for p in [pid, *descendants(pid)]:
        try:
            resident = psutil.Process(p).memory_info().rss
        except psutil.Error:  # exited meanwhile (or not ours to read): not counted
            continue
        instance = stub_instance(cmdline(p))
        name = "tritonserver" if p == pid else f"stub {instance}" if instance else f"pid {p}"
        rss[name] = rss.get(name, 0) + resident
    return rss


def _ready(protocol: str, url: str) -> bool:
    try:
        client = __import__(f"tritonclient.{protocol}", fromlist=["x"]).InferenceServerClient(url)
        ready = client.is_server_ready()
        client.close()
        return ready
    except Exception:  # noqa: BLE001 -- unreachable, a bad URL or the other protocol's port
        return False


def percentile(values, q) -> float:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


# onnxruntime's CPU arena grows in steps to the peak of the largest batch it has run and then holds
# it: on the shipped model at 128x256, 88 MiB after Triton's warm-up, 103 after the first 8-image
# batch, 123 after the second and within 1.5 MiB of that for 400 random batches of 1-8 after.
# Under load the first full batch may come at any time, late enough to look like a 5% leak.
PRIME_ROUNDS = 2


def prime(args, url: str, images) -> str:
    """Run min(concurrency, max_batch_size) images of each request shape as one batch, PRIME_ROUNDS
    times, on the model that `segment` calls, at the size `segment` sends it (its working_size).
    Says what it ran, or why it could not: then the soak goes on and counts what fails."""
    from serving.client import fetch_metadata
    from serving.processing import parse_working_size

    module = __import__(f"tritonclient.{args.protocol}", fromlist=["x"])
    client = module.InferenceServerClient(url)
    try:
        as_json = {"as_json": True} if args.protocol == "grpc" else {}
        segment = triton_parameters(client.get_model_config(SEGMENT, **as_json))
        model, working_size = segment.get("model", MODEL), parse_working_size(segment.get("working_size", ""))
        meta = fetch_metadata(client, args.protocol, model)
        batch = min(args.concurrency, meta.max_batch_size or 1)
        outputs = [module.InferRequestedOutput(n) for n in DEFAULT_OUTPUTS if n in meta.model.outputs]
        shapes = sorted({working_size or shape for _, _, shape in images})
        for height, width in shapes:
            tensor = module.InferInput(IMAGES, [batch, height, width, 3], "UINT8")
            tensor.set_data_from_numpy(np.zeros((batch, height, width, 3), np.uint8))
            for _ in range(PRIME_ROUNDS):
                client.infer(model, [tensor], outputs=outputs)
        sizes = ", ".join(f"{h}x{w}" for h, w in shapes)
        return f"{PRIME_ROUNDS} x {batch} images of {sizes} on `{model}`"
    except Exception as err:  # noqa: BLE001 -- the soak itself counts and reports what fails
        return "failed: " + " ".join(f"{type(err).__name__}: {err}".split())[:300]
    finally:
        client.close()


def run(args, url: str, pid: int, images) -> dict:
    module = __import__(f"tritonclient.{args.protocol}", fromlist=["x"])
    duration, records, first = args.minutes * 60, [], {}
    lock, start, stop = threading.Lock(), time.monotonic(), threading.Event()

    def worker(index: int):
        client = module.InferenceServerClient(url, **({"network_timeout": 120.0} if args.protocol == "http" else {}))
        wanted = [module.InferRequestedOutput(n) for n in SEGMENT_OUTPUTS]
        try:
            while time.monotonic() - start < duration and not stop.is_set():
                name, data, shape = images[index % len(images)]
                index += 1
                tensor = module.InferInput(IMAGE, [1], "BYTES")
                tensor.set_data_from_numpy(np.array([data], dtype=object))
                sent, error = time.monotonic(), None
                try:
                    labels = client.infer(SEGMENT, [tensor], outputs=wanted).as_numpy(LABELS)
                    with lock:
                        expected = first.setdefault(name, labels)
                    if labels.shape != shape:
                        error = f"{name}: labels {labels.shape}, image {shape}"
                    elif not np.array_equal(labels, expected):
                        error = (
                            f"{name}: labels differ from the first answer in {int((labels != expected).sum())} pixels"
                        )
                except Exception as err:  # noqa: BLE001 -- every failure is counted, none retried
                    error = " ".join(f"{type(err).__name__}: {err}".split())[:300]
                records.append((time.monotonic() - start, time.monotonic() - sent, error))
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    for thread in threads:
        thread.start()
    samples = []  # (seconds, {process: bytes})
    try:
        while time.monotonic() - start < duration:
            samples.append((time.monotonic() - start, tree_rss(pid)))
            time.sleep(max(0.0, min(args.sample_seconds, duration - (time.monotonic() - start))))
        samples.append((time.monotonic() - start, tree_rss(pid)))
    finally:
        stop.set()
        for thread in threads:
            thread.join(300)
    return summarize(args, records, samples)


def summarize(args, records, samples) -> dict:
    duration, warmup, window = args.minutes * 60, args.warmup_seconds, args.window_seconds
    failures = [e for _, _, e in records if e]
    messages = collections.Counter(failures)
    steady = [latency * 1000 for t, latency, e in records if t >= warmup and not e]

    def rss_median(lo, hi):
        values = [sum(r.values()) for t, r in samples if lo <= t <= hi]
        return float(np.median(values)) / MIB if values else float("nan")

    first, last = rss_median(warmup, warmup + window), rss_median(duration - window, duration)
    growth = last / first - 1 if first > 0 else float("nan")  # nan: the server was gone; the goal is missed
    timeline = []
    for lo in np.arange(0, duration - 1e-6, window):
        hi = min(lo + window, duration)
        done = [(lat, e) for t, lat, e in records if lo <= t < hi]
        timeline.append(
            {
                "from_s": round(float(lo)),
                "to_s": round(float(hi)),
                "rss_mib": round(rss_median(lo, hi), 1),
                "requests": len(done),
                "failures": sum(1 for _, e in done if e),
                "p50_ms": percentile([lat * 1000 for lat, e in done if not e], 50),
            }
        )
    after = [r for t, r in samples if t >= warmup]
    processes = {n: [round(after[0].get(n, 0) / MIB, 1), round(after[-1].get(n, 0) / MIB, 1)] for n in after[-1]}
    return {
        "requests": len(records),
        "failures": len(failures),
        "failure_messages": dict(messages.most_common(5)),
        "throughput_rps": round(sum(1 for t, _, _ in records if t >= warmup) / (duration - warmup), 2),
        "latency_ms": {f"p{q}": percentile(steady, q) for q in (50, 95, 99)},
        "rss_mib": {
            "first_window_median": round(first, 1),
            "last_window_median": round(last, 1),
            "growth": round(growth, 4),
        },
        "processes_rss_mib_first_last": processes,
        "timeline": timeline,
        "samples": len(samples),
        "goals": [
            reporting.goal("failed_requests", len(failures), 0, "<="),
            reporting.goal("rss_growth_after_warmup", growth, 0.05, "<="),
        ],
    }


def markdown(report: dict) -> list[str]:
    s, rss = report["settings"], report["rss_mib"]
    lines = reporting.header_markdown("Soak test: `segment` under constant load", report)
    lines += [
        f"{s['concurrency']} client threads ({s['protocol']}, one request in flight each, no retries) sent "
        f"`segment` requests for {s['minutes']:g} min to {s['server']}; images: {s['images']}. Every answer was "
        "checked (labels at the image's size, equal to the first answer for that image). Before the clock, the "
        f"largest batch the load can make ran straight on the model: {s['primed']}. Warm-up "
        f"{s['warmup_seconds']:g} s; RSS = tritonserver plus its python-backend stubs, summed from /proc every "
        f"{s['sample_seconds']:g} s; growth compares the medians of the first and last {s['window_seconds']:g}-s "
        f"windows after warm-up. Load average (1 min) before/after: {s['load_average_before_after'][0]} / "
        f"{s['load_average_before_after'][1]} (after includes this run).",
        "",
        "| requests | failures | throughput (req/s) | p50 ms | p95 ms | p99 ms | RSS first / last window (MiB) | "
        "growth |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {report['requests']} | {report['failures']} | {report['throughput_rps']} | {report['latency_ms']['p50']} | "
        f"{report['latency_ms']['p95']} | {report['latency_ms']['p99']} | {rss['first_window_median']} / "
        f"{rss['last_window_median']} | {100 * rss['growth']:+.2f}% |",
        "",
        "| time (s) | RSS median (MiB) | requests | failures | p50 ms |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {r['from_s']}-{r['to_s']} | {r['rss_mib']} | {r['requests']} | {r['failures']} | {r['p50_ms']} |"
            for r in report["timeline"]
        ],
        "",
        "RSS per process after warm-up, first / last sample (MiB): "
        + ", ".join(f"{n} {a} / {b}" for n, (a, b) in report["processes_rss_mib_first_last"].items())
        + ".",
        "",
        *reporting.goals_markdown(report["goals"]),
        "",
    ]
    if report["failure_messages"]:
        lines += [
            "Failures (most frequent first):",
            "",
            *[f"- {n} x `{m}`" for m, n in report["failure_messages"].items()],
            "",
        ]
    return [*lines, f"Regenerate with `{report['command']}`."]


def main(argv=None) -> int:
    args = get_args(argv)
    images = load_images(args)
    handle = None
    try:
        if args.url:
            pid, url, server = args.server_pid, args.url, f"the server at {args.url}"
            if not psutil.pid_exists(pid) or not _ready(args.protocol, url):
                print(f"error: no ready Triton server at {url} ({args.protocol}) with pid {pid}", file=sys.stderr)
                return 2
        else:
            from serving.processes import free_ports
            from serving.repository import ServerError
            from serving.supervisor import start_server

            try:
                handle = start_server(args.model_repository, *free_ports(3), timeout=300)
            except ServerError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            pid, server = handle.process.pid, f"the embedded tritonserver serving `{Path(args.model_repository).name}`"
            url = handle.http_url if args.protocol == "http" else handle.grpc_url
        primed = prime(args, url, images)
        load_before = os.getloadavg()[0]
        results = run(args, url, pid, images)
    finally:
        if handle is not None:
            handle.stop()
    report = {
        **reporting.provenance("bench.soak", argv),
        "settings": {
            "minutes": args.minutes,
            "concurrency": args.concurrency,
            "warmup_seconds": args.warmup_seconds,
            "primed": primed,
            "window_seconds": round(args.window_seconds, 1),
            "sample_seconds": round(args.sample_seconds, 2),
            "protocol": args.protocol,
            "server": server,
            "images": f"{len(images)} {args.images}"
            + (f" {args.size[0]}x{args.size[1]}" if args.images == "synthetic" else ""),
            "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        **results,
    }
    reporting.write_report(Path(args.out_dir), "soak", report, markdown(report))
    print("\n".join(reporting.goals_markdown(report["goals"])))
    return 0 if all(g["met"] for g in report["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
