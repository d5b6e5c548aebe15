"""bench.soak: one minute of `segment` load on the shipped model, and its argument errors.

The 10-minute run (`python -m bench.soak --minutes 10 --concurrency 8`) writes docs/soak.*;
this is the same code path, shortened: 20 s warm-up, then two 13-s RSS windows compared. The
arena's growth to the largest batch (8 x 128x256 here) is primed before the clock, so a step in
those windows is memory that keeps growing, not onnxruntime's arena filling late.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton ships the tritonserver binary")
pytest.importorskip("tritonclient.http")

from tests.test_serving_server import free_ports  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "model_repository" / "medoe" / "1" / "model.onnx"


def soak(*args, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.soak", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.skipif(not MODEL.is_file(), reason="the shipped model is not exported (make demo builds it)")
def test_one_minute_soak_has_no_failures_and_no_memory_growth(tmp_path):
    # The shipped model at 128x256 keeps both cores busy with 8 clients (about 100 requests/s).
    process = soak(
        "--minutes", 1, "--concurrency", 8, "--warmup-seconds", 20, "--size", "128x256", "--out-dir", tmp_path
    )
    report = json.loads((tmp_path / "soak.json").read_text())
    assert process.returncode == 0, (process.stderr[-2000:], report.get("failure_messages"), report.get("rss_mib"))
    assert report["failures"] == 0 and report["requests"] >= 200
    assert report["rss_mib"]["growth"] < 0.05 and report["rss_mib"]["first_window_median"] > 100  # stubs included
    assert {"machine", "date", "command", "settings", "latency_ms", "throughput_rps", "timeline"} <= report.keys()
    assert report["settings"]["primed"] == "2 x 8 images of 128x256 on `medoe`"
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p95"] <= report["latency_ms"]["p99"]
    assert len(report["timeline"]) >= 4 and sum(row["requests"] for row in report["timeline"]) <= report["requests"]
    assert {"stub medoe_0_0", "stub segment_0_0", "tritonserver"} <= report["processes_rss_mib_first_last"].keys()
    goals = {g["name"]: g for g in report["goals"]}
    assert set(goals) == {"failed_requests", "rss_growth_after_warmup"}
    for g in goals.values():
        assert set(g) == {"name", "measured", "target", "op", "met"} and g["op"] == "<=" and g["met"] is True
    assert goals["failed_requests"]["measured"] == 0 and goals["rss_growth_after_warmup"]["target"] == 0.05
    markdown = (tmp_path / "soak.md").read_text()
    assert "ran straight on the model: 2 x 8 images of 128x256 on `medoe`." in markdown
    assert markdown.startswith("# Soak test") and "| failed_requests | 0.0 | <= 0 | yes |" in markdown
    assert "| rss_growth_after_warmup |" in markdown and "| time (s) | RSS median (MiB) |" in markdown


@pytest.mark.parametrize(
    "args, message",
    [
        (["--size", "12"], "--size"),
        (["--minutes", "1", "--warmup-seconds", "60"], "--warmup-seconds"),
        (["--minutes", "1", "--warmup-seconds", "50", "--window-seconds", "8"], "must hold two --window-seconds"),
        (["--url", "127.0.0.1:1"], "--server-pid"),
    ],
)
def test_bad_arguments_are_exit_2_one_line(args, message, tmp_path):
    process = soak(*args, "--out-dir", tmp_path, timeout=60)
    assert process.returncode == 2
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
    assert not (tmp_path / "soak.json").exists()


def test_unreachable_url_is_exit_2_and_writes_nothing(tmp_path):
    port = free_ports(1)[0]  # nothing listens there; a typo must not overwrite docs/soak.* with failures
    process = soak(
        "--url",
        f"127.0.0.1:{port}",
        "--server-pid",
        1,
        "--num-images",
        1,
        "--size",
        "16x16",
        "--out-dir",
        tmp_path,
        timeout=60,
    )
    assert process.returncode == 2
    assert process.stderr.strip() == f"error: no ready Triton server at 127.0.0.1:{port} (http) with pid 1"
    assert not (tmp_path / "soak.json").exists()
