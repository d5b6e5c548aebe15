"""scripts/gpu_check.sh on this (CPU) machine: one line and exit 0; its python part's report, its
skips and the order of its steps on fake measurements (the GPU steps themselves need CUDA)."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the script runs the real check")
def test_script_without_cuda_says_so_in_one_line_and_exits_0(tmp_path):
    report = tmp_path / "gpu_check.json"
    done = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(report)],
        cwd=tmp_path,  # the script finds the repository itself
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout + done.stderr).strip().splitlines() == ["no CUDA device: GPU check skipped"]
    assert not report.exists()


def fake_steps():
    return {
        "training": {"status": "ok", "stage1_iterations": 20, "last_stage1_loss": 1.5, "wall_s": 31.0},
        "eager": {
            "status": "ok",
            "fp32_device_ms": 41.0,
            "fp16_autocast_device_ms": 12.5,
            "fp16_speedup_over_fp32": 3.3,
        },
        "onnxruntime_cuda": gpu_check.skipped("onnxruntime 1.32.0 has no CUDAExecutionProvider"),
        "tensorrt": gpu_check.failed("export/to_trt.py exited 1", tail="engine check failed"),
    }


def test_report_from_fake_measurements(tmp_path):
    report = gpu_check.build_report(fake_steps(), {"gpu": "fake"}, 123.456, ["--out", "x.json"])
    assert report["skipped"] == ["onnxruntime_cuda"] and report["failed"] == ["tensorrt"] and report["ok"] is False
    assert report["total_seconds"] == 123.5 and report["environment"] == {"gpu": "fake"}
    path = gpu_check.write_report(tmp_path / "sub" / "report.json", report)
    assert json.loads(path.read_text()) == report
    assert not list(path.parent.glob(".*"))  # no temporary file left beside it
    lines = gpu_check.summary(report)
    assert lines[0].startswith("training: ok ") and "wall_s 31.0" in lines[0]
    assert "fp16_autocast_device_ms 12.5" in lines[1]
    assert lines[2] == "onnxruntime_cuda: skipped (onnxruntime 1.32.0 has no CUDAExecutionProvider)"
    assert lines[3] == "tensorrt: failed (export/to_trt.py exited 1)"
    assert lines[-1] == "report: FAILED: tensorrt"
    steps = fake_steps()
    del steps["tensorrt"]
    assert gpu_check.build_report(steps, {}, 1.0, [])["ok"] is True


def test_absent_runtimes_skip_with_their_reason(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        step = gpu_check.step_onnxruntime_cuda(tmp_path / "absent.onnx", None, None, 1)
        assert step["status"] == "skipped" and "onnxruntime-gpu" in step["reason"]
    if importlib.util.find_spec("tensorrt") is None:
        step = gpu_check.step_tensorrt(tmp_path / "absent.onnx", tmp_path, None, None, 1, 10)
        assert step == {"status": "skipped", "reason": "the tensorrt package is not installed (pip install tensorrt)"}


@pytest.fixture
def fake_gpu(monkeypatch):
    """main() with CUDA pretended and every step replaced: what runs, what is skipped, what is written."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "environment", lambda: {"gpu": "fake"})
    monkeypatch.setattr(gpu_check, "fused_graph", lambda: "graph")
    monkeypatch.setattr(gpu_check, "ort_has_cuda", lambda: True)

    def fake(name, result):
        def step(*args):
            calls.append(name)
            if isinstance(result, Exception):
                raise result
            if name == "eager":
                args[-1]["fp32"] = "labels"  # step_eager's last argument collects each mode's labels
            return dict(result)

        monkeypatch.setattr(gpu_check, f"step_{name}", step)

    ok = {"status": "ok", "wall_s": 1.0}
    for name in ("training", "eager", "export", "onnxruntime_cuda", "tensorrt"):
        fake(name, ok)
    return calls, fake


def test_every_step_runs_in_order_and_the_report_is_written(fake_gpu, tmp_path, capsys):
    calls, _ = fake_gpu
    out = tmp_path / "report.json"
    assert gpu_check.main(["--out", str(out), "--size", "64x96"]) == 0
    assert calls == ["training", "eager", "export", "onnxruntime_cuda", "tensorrt"]
    report = json.loads(out.read_text())
    assert report["ok"] and list(report["steps"]) == calls
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == calls  # one line per step as it ends
    assert lines[-1].startswith("report: all steps that ran passed; written to")


def test_a_failed_eager_step_skips_what_needs_it_and_exits_1(fake_gpu, tmp_path):
    calls, fake = fake_gpu
    fake("eager", RuntimeError("CUDA out of memory"))
    out = tmp_path / "report.json"
    assert gpu_check.main(["--out", str(out)]) == 1
    assert calls == ["training", "eager"]
    report = json.loads(out.read_text())
    assert report["steps"]["eager"] == {"status": "failed", "reason": "RuntimeError: CUDA out of memory"}
    assert report["skipped"] == ["onnxruntime_cuda", "tensorrt"] and report["failed"] == ["eager"]


def test_steps_past_the_budget_are_skipped_not_started(fake_gpu, tmp_path):
    calls, _ = fake_gpu
    out = tmp_path / "report.json"
    assert gpu_check.main(["--out", str(out), "--budget-s", "45"]) == 0  # training and export need 60 s
    report = json.loads(out.read_text())
    assert calls == ["eager"]
    assert report["skipped"] == ["training", "export", "onnxruntime_cuda", "tensorrt"]
    assert "--budget-s" in report["steps"]["training"]["reason"] and "--budget-s" in report["steps"]["export"]["reason"]
    assert "export step" in report["steps"]["tensorrt"]["reason"]
