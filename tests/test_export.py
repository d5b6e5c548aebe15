"""The fused ONNX graph: exact against PyTorch at any size, metadata and Triton config from one source."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export import to_onnx
from export.graph import random_images, run_model
from medoe.checkpoint import load_checkpoint, save_checkpoint
from medoe.class_stats import ClassStats
from medoe.config import ModelConfig
from medoe.contract import read_graph_metadata
from medoe.model import build_model
from serving.model_limits import DEFAULT_MAX_BATCH_PIXELS, DEFAULT_MAX_PIXELS
from serving.ort_memory import ARENA_MAX_PIXELS, cpu_session
from tests.data_fixtures import he_init

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["road", "car", "person", "sign", "bike"]
PIXELS = [700, 150, 100, 30, 20]  # head {road, car}, body {person}, tail {sign, bike} at (0.80, 0.95)
SMALL = ["--verify-sizes", "48x64", "37x45", "64x80", "--verify-batches", "1", "3"]  # 37x45: no multiple of 8


def make_checkpoint(directory: Path, model_type: str = "medoe", context: str = "aspp", backbone: str = "tiny") -> Path:
    config = ModelConfig(
        model=model_type,
        backbone=backbone,
        context=context,
        num_classes=5,
        decoder_channels=8,
        decision_hidden=8,
        class_names=NAMES,
        palette=[[i * 40, 255 - i * 40, 7] for i in range(5)],
    )
    torch.manual_seed(0)
    model = build_model(config).eval()
    he_init(model)  # else the per-class parity would only ever look at one class
    if backbone.startswith("hrnet_"):
        set_batch_norm_statistics(model)
    stats = ClassStats(NAMES, PIXELS, [5] * 5, 5)
    if model_type == "medoe":
        model.set_groups(stats.groups(config.group_thresholds))
    return save_checkpoint(directory, model, stats)


def set_batch_norm_statistics(model: torch.nn.Module) -> None:
    """BN running statistics measured on random images, as training leaves them. HRNet sums dozens of
    residual and fusion paths: with the initial statistics (mean 0, var 1) a random HRNet's logits
    reach ~1e4, where fp32 rounding alone moves the confidence past the parity bound; a trained
    model's statistics keep them near 1, as the tiny backbone's are."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(random_images(4, 64, 96, seed=1)).permute(0, 3, 1, 2).float())
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def parse_config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def assert_config_matches_graph(config, model: onnx.ModelProto, platform: str) -> None:
    assert config.platform == platform and config.max_batch_size > 0
    names = {1: "TYPE_FP32", 2: "TYPE_UINT8"}
    for entries, values in ((config.input, model.graph.input), (config.output, model.graph.output)):
        assert [e.name for e in entries] == [v.name for v in values]
        for entry, value in zip(entries, values, strict=True):
            tensor = value.type.tensor_type
            assert model_config_pb2.DataType.Name(entry.data_type) == names[tensor.elem_type]
            assert list(entry.dims) == [d.dim_value or -1 for d in tensor.shape.dim][1:]
    expected = {p.key: p.value for p in model.metadata_props}
    if platform == "onnxruntime_onnx":  # the pixel limits serving/onnx_model.py enforces
        expected |= {
            "max_pixels": str(DEFAULT_MAX_PIXELS),
            "max_batch_pixels": str(DEFAULT_MAX_BATCH_PIXELS),
            "arena_max_pixels": str(ARENA_MAX_PIXELS),
        }
    assert expected == {k: v.string_value for k, v in config.parameters.items()}


def run_cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


@pytest.mark.parametrize("model_type", ["medoe", "baseline"])
@pytest.mark.parametrize(
    "backbone, context",
    [("tiny", "aspp"), ("tiny", "ppm"), ("tiny", "ocr"), ("mit_b0", "mlp"), ("hrnet_w18_small", "ocr")],
)
def test_export_matches_pytorch_at_sizes_other_than_the_traced_one(tmp_path, capsys, model_type, backbone, context):
    checkpoint = make_checkpoint(tmp_path / "ckpt", model_type, context, backbone)
    out = tmp_path / "repo" / "medoe" / "1" / "model.onnx"
    assert to_onnx.main(["--checkpoint", str(checkpoint), "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    assert "label agreement 100" in printed or "label agreement 99.99" in printed
    # K expert softmaxes + the selection softmax; the baseline graph needs none for labels.
    assert f"({4 if model_type == 'medoe' else 0} channel softmax(es) decomposed)" in printed
    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 17
    names = ["labels", "confidence", "expert_weights"] if model_type == "medoe" else ["labels", "confidence"]
    assert [o.name for o in model.graph.output] == names

    # An independent check at a size and batch the command did not use.
    session = cpu_session(out)
    images = random_images(2, 41, 59, seed=7)
    got = to_onnx.run_onnxruntime(session, images, names)
    expected = run_model(load_checkpoint(checkpoint).model, images, names)
    assert got["labels"].dtype == np.uint8 and got["labels"].shape == (2, 41, 59)
    assert got["confidence"].dtype == np.float32 and got["confidence"].shape == (2, 41, 59)
    assert (got["labels"] == expected["labels"]).mean() >= 0.9999
    assert np.abs(got["confidence"] - expected["confidence"]).max() <= 1e-4
    if model_type == "medoe":
        assert got["expert_weights"].shape[:2] == (2, 3)
        np.testing.assert_allclose(got["expert_weights"].sum(axis=1), 1, atol=1e-5)
        assert np.abs(got["expert_weights"] - expected["expert_weights"]).max() <= 1e-4
    assert_config_matches_graph(parse_config(out.parents[1] / "config.pbtxt"), model, "onnxruntime_onnx")


@pytest.mark.parametrize("model_type", ["medoe", "baseline"])
def test_metadata_round_trip(tmp_path, model_type):
    out = tmp_path / "model.onnx"
    assert (
        to_onnx.main(
            ["--checkpoint", str(make_checkpoint(tmp_path / "ckpt", model_type)), "--out", str(out), "--no-verify"]
        )
        == 0
    )
    meta = read_graph_metadata(onnx.load(str(out)))
    assert meta.class_names == NAMES and meta.num_classes == 5 and meta.model_type == model_type
    assert meta.palette == [[i * 40, 255 - i * 40, 7] for i in range(5)]
    assert meta.groups == {"head": [0, 1], "body": [2], "tail": [3, 4]}
    assert meta.num_experts == (3 if model_type == "medoe" else 0)
    assert meta.expert_groups == ([[0, 1], [2], [3, 4]] if model_type == "medoe" else [])
    assert not (tmp_path / "config.pbtxt").exists()  # not a Triton layout: no config


def test_probs_output_is_optional_and_sums_to_one(tmp_path):
    out = tmp_path / "model.onnx"
    args = [
        "--checkpoint",
        str(make_checkpoint(tmp_path / "ckpt", "baseline", "ppm")),
        "--out",
        str(out),
        "--outputs",
        "labels",
        "confidence",
        "probs",
        "--verify-sizes",
        "37x45",
        "--verify-batches",
        "1",
    ]
    assert to_onnx.main(args) == 0
    probs = to_onnx.run_onnxruntime(cpu_session(out), random_images(1, 30, 50, 1), ["probs"])["probs"]
    assert probs.shape == (1, 5, 30, 50)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_dynamo_exporter_is_exact_too(tmp_path, capsys):
    pytest.importorskip("onnxscript")
    out = tmp_path / "model.onnx"
    args = [
        "--checkpoint",
        str(make_checkpoint(tmp_path / "ckpt", "medoe", "ppm")),
        "--out",
        str(out),
        "--exporter",
        "dynamo",
        "--verify-sizes",
        "48x64",
        "37x45",
        "--verify-batches",
        "1",
        "3",
    ]
    assert to_onnx.main(args) == 0, capsys.readouterr().err
    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 18 and not any(n.op_type == "Softmax" for n in model.graph.node)


def test_parity_failure_exits_1_and_leaves_out_untouched(tmp_path, capsys, monkeypatch):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous model")
    real = to_onnx.run_onnxruntime

    def off_by_one(session, images, names):
        values = real(session, images, names)
        values["labels"] = (values["labels"] + 1) % 5
        return values

    monkeypatch.setattr(to_onnx, "run_onnxruntime", off_by_one)
    args = ["--checkpoint", str(make_checkpoint(tmp_path / "ckpt")), "--out", str(out), "--verify-sizes", "37x45"]
    assert to_onnx.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parity check failed" in err[0] and "label agreement" in err[0]
    assert out.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_corrupt_checkpoint_exits_2_with_one_line(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    (checkpoint / "model.safetensors").write_bytes(b"not safetensors")
    result = run_cli("export/to_onnx.py", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx"), cwd=ROOT)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "model.safetensors" in lines[0]
    assert not (tmp_path / "m.onnx").exists()


def test_unwritable_out_exits_2_with_one_line(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "file").write_text("a file where a directory should be")
    result = run_cli(
        "-m",
        "export.to_onnx",
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(tmp_path / "file" / "m.onnx"),
        cwd=tmp_path,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: cannot write")


@pytest.mark.parametrize(
    "args,message",
    [
        (["--outputs", "expert_weights"], "no expert_weights output"),
        (["--opset", "13"], "opset 17 or newer"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    checkpoint = make_checkpoint(tmp_path / "ckpt", "baseline")
    assert to_onnx.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "m.onnx"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_ppm_pooling_equals_adaptive_average_pooling_at_any_size():
    from medoe.heads import PPMHead

    torch.manual_seed(0)
    for bins in (1, 2, 3, 6):
        for height, width in [(1, 1), (2, 5), (5, 3), (7, 13), (8, 8), (33, 47), (64, 128)]:
            x = torch.randn(2, 4, height, width) * 10
            expected = torch.nn.AdaptiveAvgPool2d(bins)(x)
            torch.testing.assert_close(PPMHead.BinAverage(bins)(x), expected, rtol=1e-6, atol=1e-5)
    keys = list(PPMHead([16, 32, 64, 128], 8).state_dict())
    assert [k for k in keys if k.startswith("stages.0.")] == [  # checkpoints keep loading
        "stages.0.1.weight",
        "stages.0.2.weight",
        "stages.0.2.bias",
        "stages.0.2.running_mean",
        "stages.0.2.running_var",
        "stages.0.2.num_batches_tracked",
    ]


def test_bench_writes_markdown_and_goals(tmp_path):
    from bench import inference as bench

    args = ["--size", "64x96", "--batches", "1", "2", "--repeats", "2", "--threads", "1", "--out-dir", str(tmp_path)]
    assert bench.main(args) == 0
    report = json.loads((tmp_path / "benchmark_inference.json").read_text())
    assert {"machine", "date", "command", "goals"} <= set(report)
    assert [g["name"] for g in report["goals"]] == [
        "onnxruntime_over_pytorch_throughput_medoe_b1",
        "onnxruntime_over_pytorch_throughput_medoe_b2",
        "medoe_over_baseline_latency_onnxruntime_b1",
    ]
    assert all(set(g) == {"name", "measured", "target", "op", "met"} for g in report["goals"])
    assert "random weights" in (tmp_path / "benchmark_inference.md").read_text()
