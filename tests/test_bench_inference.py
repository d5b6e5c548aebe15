"""The real-size part of the inference benchmark (bench/inference_scale.py, bench/inference_probe.py),
run through its own code path at small settings: the tiny backbone at 64x128 instead of ResNet-50c
at 512x1024 (`--real-size-backbone tiny`), one architecture, a 256x256 GEMM roof."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.flop_counter import FlopCounterMode

from bench import inference as bench
from bench import inference_scale
from bench.inference_probe import random_model
from export.graph import build_graph, random_images, run_torch
from medoe.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--size", "64x96", "--batches", "1", "--repeats", "2", "--threads", "1"]
SMALL_REAL_SIZE = [
    "--real-size",
    "--real-size-image",
    "64x128",
    "--real-size-configs",
    "deeplabv3plus_r50c_cityscapes",
    "--real-size-backbone",
    "tiny",
    "--real-size-repeats",
    "1",
    "--scaling-sizes",
    "32x64",
    "64x128",
    "--scaling-batches",
    "1",
    "2",
    "--gemm-size",
    "256",
]


@pytest.mark.slow
def test_real_size_rows_goals_plot_and_markdown(tmp_path):
    assert bench.main([*TINY, *SMALL_REAL_SIZE, "--out-dir", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "benchmark_inference.json").read_text())
    tag = "tiny_deeplabv3plus"
    assert [g["name"] for g in report["goals"]] == [
        "onnxruntime_over_pytorch_throughput_medoe_b1",
        "medoe_over_baseline_latency_onnxruntime_b1",
        f"onnxruntime_over_pytorch_throughput_medoe_{tag}",
        f"medoe_over_baseline_latency_onnxruntime_{tag}",
        f"gemm_roof_share_onnxruntime_medoe_{tag}",
    ]
    section = report["real_size"]
    assert [g["name"] for g in section["goals"]] == [g["name"] for g in report["goals"][2:]]
    rows = section["rows"]
    assert [(r["model"], r["runtime"]) for r in rows] == list(inference_scale.ORDER)
    roof = section["gemm_roof"]
    assert roof["gflops"] == max(roof["before"]["gflops"], roof["after"]["gflops"]) > 0
    for r in rows:
        assert r["size"] == [64, 128] and r["batch"] == 1 and r["backbone"] == "tiny"
        assert r["gflop_per_image"] > 0 and r["gflops"] > 0
        assert r["gflops"] == pytest.approx(r["gflop_per_image"] / (r["latency_ms"] / 1000), rel=0.02)
        assert r["roof_share"] == pytest.approx(r["gflops"] / roof["gflops"], abs=1e-3)
        assert r["rss_run_peak_mib"] > 0 and r["rss_process_peak_mib"] >= r["rss_run_peak_mib"] - 0.1
    medoe, baseline = (next(r for r in rows if r["model"] == m) for m in ("medoe", "baseline"))
    assert medoe["gflop_per_image"] > baseline["gflop_per_image"]  # K-1 light experts and the decision maker
    # The onnxruntime probe holds no torch: its process is far smaller than the eager one.
    assert min(r["rss_loaded_mib"] for r in rows if r["runtime"] == "pytorch") > max(
        r["rss_loaded_mib"] for r in rows if r["runtime"] == "onnxruntime"
    )
    points = {(p["batch"], *p["size"]): p for p in section["scaling"]["points"]}
    assert set(points) == {(1, 32, 64), (1, 64, 128), (2, 64, 128)}
    assert points[2, 64, 128]["gflop"] == pytest.approx(2 * points[1, 64, 128]["gflop"], rel=0.01)
    ort_medoe = next(r for r in rows if (r["model"], r["runtime"]) == ("medoe", "onnxruntime"))
    assert points[1, 64, 128]["latency_ms"] == ort_medoe["latency_ms"]  # the row's own probe, not a second one
    plot = tmp_path / inference_scale.PLOT
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "benchmark_inference.md").read_text()
    assert "## Real size" in text and f"]({inference_scale.PLOT})" in text
    assert "GFLOP/s" in text and "of roof" in text
    for name in section["profiles"]:  # a profile where a goal was missed, shown in the Markdown
        assert f"Where the time goes: {name}" in text
    missed = {g["name"].rsplit("_", 1)[-1] for g in section["goals"] if not g["met"]}
    assert {name.split("_")[0] for name in section["profiles"]} == missed


def test_flop_count_on_meta_equals_the_cpu_forward_and_leaves_the_graph_alone():
    network = load_config("deeplabv3plus_r50c_cityscapes").network.replace(backbone="tiny")
    graph = build_graph(random_model(network, "medoe"))
    with FlopCounterMode(display=False) as counter:
        run_torch(graph, random_images(2, 64, 96, seed=0))
    assert inference_scale.count_gflop(graph, 2, 64, 96) == pytest.approx(counter.get_total_flops() / 1e9, rel=1e-9)
    assert next(graph.parameters()).device.type == "cpu"
    # Convolutions dominate and scale with the pixels: twice the pixels, about twice the FLOPs.
    ratio = inference_scale.count_gflop(graph, 1, 128, 96) / inference_scale.count_gflop(graph, 1, 64, 96)
    assert 1.9 < ratio < 2.1


def test_gemm_roof_measures_both_runtimes():
    roof = inference_scale.gemm_roof(threads=1, n=128, repeats=1)
    assert roof["n"] == 128 and roof["torch_matmul_gflops"] > 0 and roof["onnxruntime_matmul_gflops"] > 0
    assert roof["gflops"] == max(roof["torch_matmul_gflops"], roof["onnxruntime_matmul_gflops"])


def test_onnxruntime_probe_runs_without_torch():
    command = [sys.executable, "-m", "bench.inference_probe", "--runtime", "onnxruntime"]
    command += ["--onnx", str(ROOT / "model_repository/medoe/1/model.onnx"), "--size", "64x96", "--batch", "2"]
    command += ["--threads", "1", "--repeats", "2"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["torch_imported"] is False
    assert result["batch"] == 2 and result["size"] == [64, 96] and len(result["seconds"]) == 2
    assert 0 < result["rss_loaded_mib"] <= result["rss_process_peak_mib"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--real-size", "--real-size-configs", "no_such_config"],
        ["--real-size", "--real-size-backbone", "resnet9000"],
        ["--real-size", "--real-size-repeats", "0"],
        ["--real-size", "--scaling-batches", "0"],
    ],
)
def test_bad_real_size_arguments_exit_2_before_any_work(extra, tmp_path, capsys):
    assert bench.main([*TINY, *extra, "--out-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not list(tmp_path.iterdir())
