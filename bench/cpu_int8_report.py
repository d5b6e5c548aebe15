"""The CPU int8 benchmark's Markdown (bench/cpu_int8.py measures it)."""

from __future__ import annotations

from bench import report as reporting

OPENVINO_INT8_OK = 0.99  # below this label agreement with fp32 the report explains OpenVINO's int8 result


def timing_lines(part: dict) -> list[str]:
    lines = ["| runtime | latency (ms) | speedup vs onnxruntime fp32 | label agreement with onnxruntime fp32 |"]
    lines.append("|---|---:|---:|---:|")
    for name, ms in part["latency_ms"].items():
        lines.append(
            f"| {name} | {ms:.1f} | {part['speedup_over_onnxruntime_fp32'][name]:.2f}x | "
            f"{100 * part['label_agreement_with_onnxruntime_fp32'][name]:.2f}% |"
        )
    return lines


def profile_lines(part: dict) -> list[str]:
    profile = part["profile_b1"]
    ops = list(dict.fromkeys([*profile["int8"]["ops_ms"], *profile["fp32"]["ops_ms"]]))[:12]
    lines = ["| op type | fp32 (ms) | int8 (ms) |", "|---|---:|---:|"]
    lines += [
        f"| {op} | {profile['fp32']['ops_ms'].get(op, 0):.1f} | {profile['int8']['ops_ms'].get(op, 0):.1f} |"
        for op in ops
    ]
    lines.append(f"| all nodes | {profile['fp32']['total_ms']:.1f} | {profile['int8']['total_ms']:.1f} |")
    kinds = profile["int8"]["by_kind_ms"]
    lines += [
        "",
        "int8 graph by kind of kernel: " + ", ".join(f"{k} {v:.1f} ms" for k, v in kinds.items()) + ".",
    ]
    return lines


def quantization_lines(q: dict) -> list[str]:
    return [
        f"Quantized in {q['seconds']:.0f} s on {q['calibration_images']} train-split images at "
        f"{q['calibration_size'][0]}x{q['calibration_size'][1]} "
        f"({q['size_mib']['fp32']} -> {q['size_mib']['int8']} MiB). "
        f"Nodes computing on int8 inputs: {q['quantized_ops']}. Kept float on purpose: {q['float_nodes']} nodes "
        f"({q['float_ops']}): the input convolution and the classifiers with everything after them "
        "(export/quantize.py says why).",
    ]


def markdown(report: dict) -> list[str]:
    s, shipped, r50c = report["settings"], report["shipped"], report["r50c"]
    lines = reporting.header_markdown("CPU int8: onnxruntime fp32 vs int8 (QDQ) vs OpenVINO", report)
    lines += [
        f"onnxruntime {s['onnxruntime']}, OpenVINO {s['openvino'] or 'not installed'}; {s['threads']} threads each "
        f"(OpenVINO: LATENCY hint, f32 inference precision); batch 1, {s['size'][0]}x{s['size'][1]} random uint8 "
        f"image; median of {s['repeats']} runs per runtime after one warm-up, in blocks ordered "
        "A B C D D C B A. The int8 graph is export/quantize.py's: static QDQ (onnxruntime quantize_static, "
        "MinMax, per-channel int8 weights, uint8 activations). CPU int8 flags: "
        f"{', '.join(s['cpu_flags']) or 'none'} (no VNNI: int8 dot products take three instructions, not one). "
        f"Load average (1 min) before/after: {s['load_average_before_after'][0]} / "
        f"{s['load_average_before_after'][1]}.",
        "",
        *reporting.goals_markdown(report["goals"]),
        "",
    ]
    if isinstance(r50c, dict):
        lines += [
            f"## R50c scale: DeepLabv3+ MEDOE, resnet50c, K=3, random weights ({r50c['parameters']:,} parameters)",
            "",
            *timing_lines(r50c),
            "",
            "(Random weights: the label agreement on one random image is a sanity check, not an accuracy.)",
            "",
            *quantization_lines(r50c["quantization"]),
            "",
            "### Where the time goes (onnxruntime profiler, ms per run by op type)",
            "",
            *profile_lines(r50c),
            "",
        ]
    else:
        lines += ["## R50c scale", "", f"Not run: {r50c}.", ""]
    t = shipped["test_split"]
    lines += [
        f"## The shipped model (`{shipped['graph']}`, tiny backbone)",
        "",
        f"Re-quantized from the shipped fp32 graph; labels scored against the synthetic `test` split "
        f"({t['images']} of {t['of']} images, 256x512, config `{t['config']}`).",
        "",
        "| runtime | mIoU | mAcc | label agreement with onnxruntime fp32 | max abs delta confidence |",
        "|---|---:|---:|---:|---:|",
        *[
            f"| {name} | {v['mIoU']:.2f} | {v['mAcc']:.2f} | {100 * v['label_agreement_with_onnxruntime_fp32']:.2f}% | "
            f"{v['max_abs_delta_confidence']:.3f} |"
            for name, v in shipped["scores"].items()
        ],
        "",
        f"Latency at {s['size'][0]}x{s['size'][1]}:",
        "",
        *timing_lines(shipped),
        "",
        *quantization_lines(shipped["quantization"]),
        "",
        "### Where the time goes (onnxruntime profiler, ms per run by op type)",
        "",
        *profile_lines(shipped),
        "",
    ]
    openvino_int8 = shipped["scores"].get("openvino int8")
    if openvino_int8 and openvino_int8["label_agreement_with_onnxruntime_fp32"] < OPENVINO_INT8_OK:
        ort_int8 = shipped["scores"]["onnxruntime int8"]
        lines += [
            f"**OpenVINO runs the int8 QDQ graph but computes it differently**: "
            f"{100 * openvino_int8['label_agreement_with_onnxruntime_fp32']:.2f}% label agreement with fp32 and "
            f"mIoU {openvino_int8['mIoU']:.2f}, against onnxruntime int8's "
            f"{100 * ort_int8['label_agreement_with_onnxruntime_fp32']:.2f}% and {ort_int8['mIoU']:.2f}. On the "
            "shipped model (2026-12, OpenVINO 2026.4.1, AVX2 without VNNI) it was traced to one layer: with only "
            "the decoder's `low_project` 1x1 convolution quantized, OpenVINO's labels already agree on 89.5% "
            "(onnxruntime 99.9%); with it and the Concat it feeds kept float, 99.8%. Its int8 latency is shown for "
            "comparison only: the graph to serve on OpenVINO would be quantized with OpenVINO's own tools (NNCF).",
            "",
        ]
    if report["notes"]:
        lines += ["Notes: " + "; ".join(f"{k}: {v}" for k, v in report["notes"].items()) + ".", ""]
    missed = [g for g in report["goals"] if not g["met"]]
    if missed:
        lines += [
            "Goals missed: " + ", ".join(g["name"] for g in missed) + ". The profiles above say where the time goes "
            "(int8 kernels against the float ones kept and the quantize/dequantize steps between them); the JSON "
            "file has every op type (`profile_b1`) and the names of the convolutions kept float.",
            "",
        ]
    if s["load_average_before_after"][0] > 0.5:
        lines += [
            f"**The machine was shared during this run (load average {s['load_average_before_after'][0]} on "
            f"{report['machine']['logical_cores']} cores)**: the latencies are noisy; rerun on an idle machine.",
            "",
        ]
    lines.append(f"Total wall time {report['total_seconds']:.0f} s. Regenerate with `{report['command']}`.")
    return lines
