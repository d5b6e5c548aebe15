"""Memory benchmark: cost per megapixel, and what comes back after a large request.

    python -m bench.memory                  # ~3 min on 2 cores

1. onnxruntime alone, the repository's model.onnx, one fresh process per setting
   (bench/memory_probe.py): CPU arena on (onnxruntime's default), arena with shrinkage per
   run, arena off, arena off with MALLOC_ARENA_MAX=2 or fixed glibc mmap/trim thresholds, and the
   shipped pair of sessions (serving/ort_memory.py). Each:
   RSS idle, peak and after one --large image, after malloc_trim(0); and the p50 of a 256x512
   and a 1024x2048 image, from --rounds rounds of one short process per setting in turn (malloc
   settings are process-wide, and alternating lets the load of a shared machine weigh on all alike).
2. The server as shipped (serving/onnx_model.py with ort_memory.MemorySession): one `segment`
   PNG of 4 MP (within the arena's calls) and one at the repository's `max_pixels` (above them);
   memory of tritonserver and
   its stubs sampled every 50 ms from /proc/PID/smaps_rollup as PSS, so that the stubs'
   shared-memory pools count once. Then the over-limit requests: a 6000x6000 PNG and a raw
   `medoe` batch over `max_batch_pixels`.
Writes docs/benchmark_memory.{md,json}; exit 0 when every goal is met, 1 when not, 2 on bad arguments.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench import report as reporting
from bench.memory_probe import SETTINGS
from medoe.cli import CliParser
from medoe.contract import IMAGE, IMAGES, MODEL, SEGMENT
from serving.ort_memory import ARENA_MAX_PIXELS, TRIM_DELAY_S
from serving.processes import cmdline, descendants, stub_instance

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = "shipped"
MIB = 1024 * 1024
SMALL, MEDIUM, MEDIUM_RUNS = "1x256x512", "1x1024x2048", 3


def get_args(argv=None):
    parser = CliParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-repository", default=str(ROOT / "model_repository"))
    parser.add_argument(
        "--large", default="1x3000x4000", help="NxHxW of the in-process large run (12 MP: a 4000x3000 photo)"
    )
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds, one process per setting each")
    parser.add_argument("--runs", type=int, default=10, help="timed 256x512 runs per process (and 3 of 1024x2048)")
    parser.add_argument("--out-dir", default=str(reporting.DOCS_DIR))
    return parser.parse_args(argv)


def probe(setting: str, onnx_path: Path, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | SETTINGS[setting][2]
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory_probe", "--setting", setting, "--onnx", str(onnx_path), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        raise RuntimeError(f"memory_probe {setting} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def onnxruntime_alone(args, onnx_path: Path) -> tuple[dict, dict]:
    probes = {}
    for setting in args.settings:
        result = probe(setting, onnx_path, "--large", args.large)
        rss = result["rss_mib"]
        result["peak_over_idle_mib_per_mp"] = round(
            (rss["peak"] - rss["idle"]) / (math.prod(result["large"][:3]) / 1e6), 1
        )
        probes[setting] = result
    # One process per setting per round, the settings in turn; and arena off with malloc_trim after
    # every small call, to show why the server trims only after large ones. A ratio is the median
    # over rounds of the setting's p50 over the first setting's p50 in the same round: a burst of
    # load from elsewhere on a shared machine then spoils one round, not the result.
    variants = [(st, False) for st in args.settings] + ([("no_arena", True)] if "no_arena" in args.settings else [])
    sizes = [f"{SMALL}:{args.runs}", f"{MEDIUM}:{MEDIUM_RUNS}"]
    rounds = []
    for _ in range(args.rounds):
        rounds.append(
            {
                v: probe(v[0], onnx_path, "--latency", *sizes, *(("--trim-every-call",) if v[1] else ()))["ms"]
                for v in variants
            }
        )
    first = (args.settings[0], False)  # `arena`, onnxruntime's default, unless --settings says otherwise

    def summary(variant, size, reference=first) -> tuple[float, float]:
        pooled = float(np.median([t for r in rounds for t in r[variant][size]]))
        ratio = float(np.median([np.median(r[variant][size]) / np.median(r[reference][size]) for r in rounds]))
        return round(pooled, 2), round(ratio, 3)

    for setting in args.settings:
        for key, size in (("small", SMALL), ("medium", MEDIUM)):
            probes[setting][f"{key}_p50_ms"], probes[setting][f"{key}_p50_ratio"] = summary((setting, False), size)
    trim_every = {}
    if "no_arena" in args.settings:
        value, ratio = summary(("no_arena", True), SMALL, reference=("no_arena", False))
        trim_every = {"small_p50_ms": value, "ratio_to_no_trim": ratio}
    return probes, trim_every


def tree_memory(pid: int) -> dict[str, dict[str, float]]:
    """Pss, Pss_Anon (private heap) and Pss_Shmem (the stubs' pools) in MiB of tritonserver and each descendant."""
    tree = {}
    for p in [pid, *descendants(pid)]:
        if (values := pss_split(p)) is None:
            continue
        name = "tritonserver" if p == pid else stub_instance(cmdline(p)) or f"pid {p}"
        tree[name] = {k: round(values.get(k, 0.0), 1) for k in ("Pss", "Pss_Anon", "Pss_Shmem")}
    return tree


def pss_split(pid: int) -> dict[str, float] | None:
    """/proc/PID/smaps_rollup in MiB; None once `pid` has exited. Read here, not with psutil:
    psutil's memory_full_info() has the PSS total but not its anonymous / shared-memory parts,
    and one read keeps the three from the same instant."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    except OSError:
        return None
    return {k: int(v.split()[0]) / 1024 for k, v in (line.split(":", 1) for line in lines)}


def total(tree: dict) -> float:
    return round(sum(v["Pss"] for v in tree.values()), 1)


def gradient_png(height: int, width: int) -> bytes:
    import cv2

    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = (np.arange(width) % 256)[None, :]
    image[..., 1] = (np.arange(height) % 256)[:, None]
    return cv2.imencode(".png", image)[1].tobytes()


def request(client, module, model: str, array: np.ndarray) -> tuple[str, float]:
    """('ok' or the error's status and message, seconds)."""
    tensor = module.InferInput(
        IMAGE if model == SEGMENT else IMAGES, list(array.shape), "BYTES" if model == SEGMENT else "UINT8"
    )
    tensor.set_data_from_numpy(array)
    start = time.monotonic()
    try:
        client.infer(model, [tensor])
        answer = "ok"
    except module.InferenceServerException as err:
        answer = f"{err.status()}: {err.message()}"
    return answer, round(time.monotonic() - start, 2)


def measured_request(handle, client, module, model: str, array: np.ndarray, megapixels: float) -> dict:
    pid, peak, stop = handle.process.pid, {"total": 0.0}, threading.Event()
    before = tree_memory(pid)

    def sample():
        while not stop.is_set():
            tree = tree_memory(pid)
            if total(tree) > peak["total"]:
                peak.update(total=total(tree), tree=tree)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answer, seconds = request(client, module, model, array)
    finally:
        stop.set()
        sampler.join()
    time.sleep(TRIM_DELAY_S + 1.0)  # onnx_model.py's second malloc_trim, after the response is sent
    after = tree_memory(pid)
    return {
        "megapixels": round(megapixels, 2),
        "answer": answer[:300],
        "seconds": seconds,
        "pss_before_mib": total(before),
        "pss_peak_mib": max(peak["total"], total(after)),
        "pss_after_mib": total(after),
        "before": before,
        "at_peak": peak.get("tree", after),
        "after": after,
        "shm_pools_mib": shm_pools(handle),
    }


def shm_pools(handle) -> float:
    """tmpfs pages held by the stubs' shared-memory regions (Triton grows them and never shrinks them)."""
    used = 0
    for _, region in handle.stubs.values():
        try:
            used += os.stat(f"/dev/shm/{region}").st_blocks * 512
        except OSError:
            continue
    return round(used / MIB, 1)


def config_limits(repository: Path) -> tuple[int, int]:
    from serving.model_limits import read_limits
    from serving.repository import read_model_config

    config = read_model_config(repository / MODEL / "config.pbtxt")
    return read_limits({k: {"string_value": v.string_value} for k, v in config.parameters.items()})


def server_part(repository: Path) -> dict:
    import tritonclient.http as httpclient

    from serving.processes import free_ports
    from serving.supervisor import start_server

    max_pixels, max_batch_pixels = config_limits(repository)
    side = math.isqrt(max_pixels)
    handle = start_server(repository, *free_ports(3), timeout=300)
    client = httpclient.InferenceServerClient(handle.http_url, network_timeout=600)
    try:
        request(client, httpclient, SEGMENT, np.array([gradient_png(256, 512)], dtype=object))  # every stub warm
        idle = tree_memory(handle.process.pid)
        runs = {}
        for height, width in ((2048, 2048), (side, side)):
            png = np.array([gradient_png(height, width)], dtype=object)
            runs[f"segment {width}x{height}"] = measured_request(
                handle, client, httpclient, SEGMENT, png, height * width / 1e6
            )
        batch = max_batch_pixels // (2048 * 2048) + 1
        refused = {
            "segment 6000x6000 PNG": request(
                client, httpclient, SEGMENT, np.array([gradient_png(6000, 6000)], dtype=object)
            ),
            f"medoe raw {batch}x2048x2048x3": request(
                client, httpclient, MODEL, np.zeros((batch, 2048, 2048, 3), np.uint8)
            ),
        }
        final = tree_memory(handle.process.pid)
    finally:
        client.close()
        handle.stop()
    for run in runs.values():
        run["peak_over_idle_mib_per_mp"] = round((run["pss_peak_mib"] - total(idle)) / run["megapixels"], 1)
    return {
        "max_pixels": max_pixels,
        "max_batch_pixels": max_batch_pixels,
        "idle": idle,
        "pss_idle_mib": total(idle),
        "runs": runs,
        "refused": {k: {"answer": a[:300], "seconds": s} for k, (a, s) in refused.items()},
        "pss_final_mib": total(final),
        "final": final,
    }


def goals(probes: dict, server: dict) -> list[dict]:
    worst = list(server["runs"].values())[-1]
    medoe = next(n for n in server["idle"] if n.startswith("medoe"))
    returned = worst["after"][medoe]["Pss_Anon"] - worst["before"][medoe]["Pss_Anon"]  # before: what the arena kept
    refused = sum("400" in r["answer"] and "over the limit" in r["answer"] for r in server["refused"].values())
    result = [
        reporting.goal("worst_case_request_peak_gib", worst["pss_peak_mib"] / 1024, 4.0, "<="),
        reporting.goal("medoe_private_mib_kept_by_worst_case", returned, 64, "<="),
        reporting.goal("over_limit_requests_refused", refused, len(server["refused"]), ">="),
    ]
    if SHIPPED in probes:
        result += [
            reporting.goal("shipped_small_p50_ratio_vs_arena", probes[SHIPPED]["small_p50_ratio"], 1.15, "<="),
            reporting.goal("shipped_medium_p50_ratio_vs_arena", probes[SHIPPED]["medium_p50_ratio"], 1.15, "<="),
        ]
    return result


def markdown(report: dict) -> list[str]:
    s, probes = report["server"], report["onnxruntime_alone"]
    lines = reporting.header_markdown("Memory: cost per megapixel, and what comes back after a large request", report)
    lines += [
        "## onnxruntime alone, one fresh process per setting",
        "",
        f"The repository's model.onnx, one {'x'.join(map(str, report['large']))} image (uint8) after three 256x512 "
        "warm-up "
        "runs. RSS in MiB; peak = VmHWM reset just before the large run. p50: one 256x512 (small) or 1024x2048 "
        f"(medium) image, {report['latency_rounds']} rounds of one process per setting in turn, "
        f"{report['latency_runs']} "
        f"(small) or {MEDIUM_RUNS} (medium) timed runs each; p50 over all rounds, ratio = median over rounds of the "
        "p50 "
        "over the first row's in the same round. Load average (1 min) before/after: "
        f"{report['load_average_before_after'][0]} / {report['load_average_before_after'][1]}.",
        "",
        "| setting | idle | peak | after | after malloc_trim | after 5 small runs | (peak - idle) / MP | large run s "
        "| small p50 ms | ratio | medium p50 ms | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in probes.values():
        r = p["rss_mib"]
        lines.append(
            f"| {p['description']} | {r['idle']:.0f} | {r['peak']:.0f} | {r['after']:.0f} | "
            f"{r['after_malloc_trim']:.0f} "
            f"| {r['after_small_runs']:.0f} | {p['peak_over_idle_mib_per_mp']} | {p['large_seconds']} | "
            f"{p['small_p50_ms']} "
            f"| {p['small_p50_ratio']} | {p['medium_p50_ms']} | {p['medium_p50_ratio']} |"
        )
    if {"arena", "no_arena", SHIPPED} <= set(probes):
        a, n, c = probes["arena"], probes["no_arena"], probes[SHIPPED]
        lines += [
            "",
            f"Shipped: the arena for calls up to {report['arena_max_pixels']} pixels, as fast as onnxruntime's default "
            f"(x{c['small_p50_ratio']} small, x{c['medium_p50_ratio']} medium); above, no arena and malloc_trim: "
            f"{c['peak_over_idle_mib_per_mp']} MiB per MP while it runs instead of {a['peak_over_idle_mib_per_mp']}, "
            "and "
            f"{c['rss_mib']['after']:.0f} MiB after instead of {a['rss_mib']['after']:.0f}. The arena off for every "
            "call "
            f"would cost x{n['medium_p50_ratio']} on the medium image.",
        ]
    if report["trim_every_call"]:
        t, p = report["trim_every_call"], probes["no_arena"]
        lines += [
            "",
            f"malloc_trim(0) after every 256x512 call (arena off): p50 {t['small_p50_ms']} ms, "
            f"x{t['ratio_to_no_trim']} "
            f"of the same without; one after the large run took {p['malloc_trim_ms']} ms. Hence the shipped setting "
            f"keeps the arena for calls up to {report['arena_max_pixels']} pixels and trims only after larger ones.",
        ]
    lines += [
        "",
        "## The server as shipped",
        "",
        f"`max_pixels` {s['max_pixels']}, `max_batch_pixels` {s['max_batch_pixels']}; calls up to "
        f"{report['arena_max_pixels']} pixels with onnxruntime's arena, larger ones without and malloc_trim at once "
        "and "
        f"{TRIM_DELAY_S:g} s later; 'after' is read 1 s after that. Memory = PSS of tritonserver and its "
        "python-backend stubs, in MiB, sampled every "
        f"50 ms (shared-memory pools counted once). Idle (after one 256x512 request): {s['pss_idle_mib']}.",
        "",
        "| request | MP | s | before | peak | after | (peak - idle) / MP | medoe stub private before / after | "
        "stubs' shm pools |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    medoe = next(n for n in s["idle"] if n.startswith("medoe"))
    for name, r in s["runs"].items():
        lines.append(
            f"| {name} ({r['answer'][:40]}) | {r['megapixels']} | {r['seconds']} | {r['pss_before_mib']} | "
            f"{r['pss_peak_mib']} "
            f"| {r['pss_after_mib']} | {r['peak_over_idle_mib_per_mp']} | {r['before'][medoe]['Pss_Anon']} / "
            f"{r['after'][medoe]['Pss_Anon']} | {r['shm_pools_mib']} |"
        )
    worst = list(s["runs"].values())[-1]
    lines += [
        "",
        "Per process at the peak and after the largest request (PSS / private / shared memory, MiB): "
        + "; ".join(
            f"{n} {worst['at_peak'][n]['Pss']} -> {v['Pss']} / {v['Pss_Anon']} / {v['Pss_Shmem']}"
            for n, v in worst["after"].items()
            if n in worst["at_peak"]
        )
        + ".",
        "",
        "| refused request | answer | s |",
        "|---|---|---:|",
        *[f"| {n} | `{r['answer'][:160]}` | {r['seconds']} |" for n, r in s["refused"].items()],
        "",
        "What stays after a large request is the stubs' shared-memory pools: the python backend grows a stub's pool "
        "when a tensor does not fit and never shrinks it; later requests reuse it. `max_pixels` bounds it.",
        "",
        *reporting.goals_markdown(report["goals"]),
        "",
        f"Regenerate with `{report['command']}`.",
    ]
    return lines


def main(argv=None) -> int:
    args = get_args(argv)
    repository = Path(args.model_repository)
    onnx_path = repository / MODEL / "1" / "model.onnx"
    if not onnx_path.is_file():
        print(f"error: no {onnx_path}", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    try:
        probes, trim_every_call = onnxruntime_alone(args, onnx_path)
        server = server_part(repository)
    except Exception as err:  # noqa: BLE001 -- a failed probe or server start: one line, exit 2
        print(f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}", file=sys.stderr)
        return 2
    report = {
        **reporting.provenance("bench.memory", argv),
        "large": [int(v) for v in args.large.split("x")],
        "arena_max_pixels": ARENA_MAX_PIXELS,
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "latency_rounds": args.rounds,
        "latency_runs": args.runs,
        "onnxruntime_alone": probes,
        "trim_every_call": trim_every_call,
        "server": server,
    }
    report["goals"] = goals(probes, server)
    reporting.write_report(Path(args.out_dir), "benchmark_memory", report, markdown(report))
    print("\n".join(reporting.goals_markdown(report["goals"])))
    return 0 if all(g["met"] for g in report["goals"]) else 1


if __name__ == "__main__":
    sys.exit(main())
