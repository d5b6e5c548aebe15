"""The real-size section's goals, Markdown and scaling plot (bench/inference_scale.py measures it)."""

from __future__ import annotations

import io
from pathlib import Path

from bench import report as reporting
from medoe.io import atomic_write_bytes

PLOT = "benchmark_inference_scaling.png"
GEMM_LIKE = ("Conv", "FusedConv", "MatMul", "FusedMatMul", "Gemm", "ConvTranspose")


def backbone_tag(backbone: str) -> str:
    return backbone.replace("resnet", "r")  # resnet50c -> r50c


def ratios_and_goals(rows: list[dict]) -> tuple[dict, list[dict]]:
    def find(arch, model, runtime):
        return next(r for r in rows if (r["arch"], r["model"], r["runtime"]) == (arch, model, runtime))

    ratios, goals = {}, []
    for arch in dict.fromkeys(r["arch"] for r in rows):
        tag = f"{backbone_tag(find(arch, 'medoe', 'onnxruntime')['backbone'])}_{arch}"
        for model in ("medoe", "baseline"):
            ratios[f"onnxruntime_over_pytorch_throughput_{model}_{tag}"] = (
                find(arch, model, "onnxruntime")["images_per_s"] / find(arch, model, "pytorch")["images_per_s"]
            )
        for runtime in ("onnxruntime", "pytorch"):
            ratios[f"medoe_over_baseline_latency_{runtime}_{tag}"] = (
                find(arch, "medoe", runtime)["latency_ms"] / find(arch, "baseline", runtime)["latency_ms"]
            )
            ratios[f"gemm_roof_share_{runtime}_medoe_{tag}"] = find(arch, "medoe", runtime)["roof_share"]
        goals += [
            reporting.goal(
                f"onnxruntime_over_pytorch_throughput_medoe_{tag}",
                ratios[f"onnxruntime_over_pytorch_throughput_medoe_{tag}"],
                1.3,
                ">=",
            ),
            reporting.goal(
                f"medoe_over_baseline_latency_onnxruntime_{tag}",
                ratios[f"medoe_over_baseline_latency_onnxruntime_{tag}"],
                1.25,
                "<=",
            ),
            reporting.goal(
                f"gemm_roof_share_onnxruntime_medoe_{tag}",
                ratios[f"gemm_roof_share_onnxruntime_medoe_{tag}"],
                0.8,
                ">=",
            ),
        ]
    return {k: round(v, 3) for k, v in ratios.items()}, goals


def plot_scaling(points: list[dict], path: Path, title: str) -> Path:
    """Latency and peak RSS against megapixels per call: image sizes at batch 1 as a line, larger batches apart."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6))
    sizes = sorted((p for p in points if p["batch"] == 1), key=lambda p: p["megapixels"])
    batches = [p for p in points if p["batch"] > 1]
    for column, (key, label, scale) in enumerate(
        [("latency_ms", "latency (s)", 1e-3), ("rss_run_peak_mib", "peak RSS while running (GiB)", 1 / 1024)]
    ):
        axes = figure.add_subplot(1, 2, column + 1)
        x = [p["megapixels"] for p in sizes]
        axes.plot(x, [(p[key] or 0) * scale for p in sizes], "o-", color="#4c72b0", label="batch 1, image size grows")
        if batches:
            axes.plot(
                [p["megapixels"] for p in batches],
                [(p[key] or 0) * scale for p in batches],
                "s",
                color="#c44e52",
                markersize=8,
                label="batch grows at " + "x".join(map(str, batches[0]["size"])),
            )
        for p in points:
            text = ("" if p["batch"] == 1 else f"{p['batch']}x") + "x".join(map(str, p["size"]))
            axes.annotate(
                text, (p["megapixels"], (p[key] or 0) * scale), textcoords="offset points", xytext=(4, -12), fontsize=7
            )
        axes.set_xlabel("megapixels per call (N x H x W)")
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
        axes.set_xlim(0, 1.15 * max(p["megapixels"] for p in points))
        axes.set_ylim(0, 1.3 * max((p[key] or 0) * scale for p in points) or 1)
        axes.legend(fontsize=7, frameon=False, loc="upper left")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return path


def markdown(section: dict) -> list[str]:
    s, roof = section["settings"], section["gemm_roof"]
    h, w = s["size"]
    lines = [
        f"## Real size: {', '.join(dict.fromkeys(r['arch'] for r in section['rows']))} on "
        f"{', '.join(dict.fromkeys(r['backbone'] for r in section['rows']))} at {h}x{w}, batch 1",
        "",
        "Random weights (seed 0), MEDOE K=3 and the baseline per architecture. Every row runs in its own process "
        f"(`bench/inference_probe.py`), {s['repeats']} timed run(s) after one warm-up, median; the order per "
        "architecture is MEDOE PyTorch, MEDOE onnxruntime, baseline onnxruntime, baseline PyTorch. "
        "GFLOP: `FlopCounterMode` around the eager ExportGraph forward (on the meta device), convolutions and matrix "
        "products only, 2 FLOP per multiply-add; onnxruntime runs the same graph, so the same count. "
        f"GEMM roof: best of 3 fp32 {roof['before']['n']}x{roof['before']['n']} matrix products with "
        f"{s['threads']} thread(s), torch.matmul {roof['before']['torch_matmul_gflops']} / "
        f"{roof['after']['torch_matmul_gflops']} GFLOP/s and onnxruntime MatMul "
        f"{roof['before']['onnxruntime_matmul_gflops']} / {roof['after']['onnxruntime_matmul_gflops']} GFLOP/s "
        f"(before / after the rows); the roof is the best, **{roof['gflops']} GFLOP/s**. "
        "Memory: the probe's peak RSS while running (VmHWM reset once the model or session is loaded, weights "
        "included; the onnxruntime probe never imports torch); RSS loaded is before the first run.",
        "",
        "| architecture | model | runtime | latency (s) | images/s | GFLOP/image | GFLOP/s | of roof | "
        "peak RSS running (MiB) | RSS loaded (MiB) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {r['arch']} | {r['model']} | {r['runtime']} | {r['latency_ms'] / 1000:.3f} | {r['images_per_s']:.3f} | "
            f"{r['gflop_per_image']:.1f} | {r['gflops']:.1f} | {r['roof_share']:.2f} | {r['rss_run_peak_mib']} | "
            f"{r['rss_loaded_mib']} |"
            for r in section["rows"]
        ],
        "",
        "| ratio | value |",
        "|---|---:|",
        *[f"| {k} | {v:.3f} |" for k, v in section["ratios"].items()],
        "",
        *reporting.goals_markdown(section["goals"]),
        "",
    ]
    points = section["scaling"]["points"]
    if points:
        base = min(points, key=lambda p: p["megapixels"])
        lines += [
            f"### How cost grows: {section['scaling']['model']}",
            "",
            f"![latency and peak memory against pixels per call]({PLOT})",
            "",
            "| batch | size | megapixels per call | latency (s) | s per megapixel | GFLOP/s | peak RSS running (MiB) "
            "| MiB per megapixel over loaded |",
            "|---:|---|---:|---:|---:|---:|---:|---:|",
            *[
                f"| {p['batch']} | {p['size'][0]}x{p['size'][1]} | {p['megapixels']:.3f} | "
                f"{p['latency_ms'] / 1000:.3f} | {p['latency_ms'] / 1000 / p['megapixels']:.2f} | {p['gflops']:.1f} | "
                f"{p['rss_run_peak_mib']} | "
                + (
                    f"{(p['rss_run_peak_mib'] - p['rss_loaded_mib']) / p['megapixels']:.0f} |"
                    if p["rss_run_peak_mib"] is not None
                    else "n/a |"
                )
                for p in sorted(points, key=lambda p: (p["megapixels"], p["batch"]))
            ],
            "",
            f"Latency per megapixel at the smallest point: {base['latency_ms'] / 1000 / base['megapixels']:.2f} s; a "
            "constant value down the column means cost grows linearly with pixels.",
            "",
        ]
    for name, profile in section["profiles"].items():
        total = profile["total_ms"] or 1.0
        gemm = sum(v for k, v in profile["ops_ms"].items() if k in GEMM_LIKE)
        arch_row = next(r for r in section["rows"] if f"{r['arch']}_medoe" == name and r["runtime"] == "onnxruntime")
        conv_rate = arch_row["gflop_per_image"] / (gemm / 1000) if gemm else 0.0
        lines += [
            f"### Where the time goes: {name} on onnxruntime (a goal of it missed; profiler, ms per run by op type)",
            "",
            "| op type | ms | share |",
            "|---|---:|---:|",
            *[f"| {op} | {ms:.1f} | {100 * ms / total:.1f}% |" for op, ms in list(profile["ops_ms"].items())[:10]],
            f"| all nodes | {profile['total_ms']:.1f} | 100% |",
            "",
            f"Convolutions and matrix products ({', '.join(GEMM_LIKE)}) take {100 * gemm / total:.1f}% of node time "
            f"and run the counted FLOPs at {conv_rate:.1f} GFLOP/s ({conv_rate / roof['gflops']:.2f} of the roof); "
            "the rest of the node time is the ops the FLOP count leaves out.",
            "",
        ]
    lines.append(f"Real-size part: {section['seconds']:.0f} s.")
    return lines
