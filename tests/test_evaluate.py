"""Evaluation: sliding-window inference, the per-class plot and Markdown, and CLI errors."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from medoe.model import Segmentation
from tests.data_fixtures import write_small_config
from training import evaluate, train
from training.common import get_dataset
from training.inference import default_stride, slide_inference, window_grid
from training.plots import plot_comparison, plot_path, plot_per_class

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One tiny MEDOE run (64x128 images, 64x64 crops) shared by the whole module."""
    root = tmp_path_factory.mktemp("evaluate")
    write_small_config(root / "small.json")
    work = root / "run"
    assert (
        train.main(
            [
                "--config",
                str(root / "small.json"),
                "--work-dir",
                str(work),
                "--iters",
                "2",
                "--stage2-iters",
                "1",
                "--no-eval",
            ]
        )
        == 0
    )
    return work / "final"


@pytest.fixture(scope="module")
def loaded(checkpoint):
    from medoe.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def whole_metrics(loaded):
    dataset = get_dataset(loaded.run, "val")
    # Positional call, as train.py and benchmark.py make it.
    return evaluate.evaluate(loaded.model, dataset, torch.device("cpu"), loaded.run, loaded.class_stats)


class PixelwiseModel(nn.Module):
    """A 1x1 convolution: its output at a pixel ignores every other pixel, so windows cannot change it."""

    def __init__(self, num_classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, num_classes, 1)

    def forward(self, images):
        probs = torch.softmax(self.conv(images / 255.0), dim=1)
        confidence, labels = probs.max(dim=1)
        return Segmentation(labels, confidence, probs, None)


def test_window_grid_matches_mmseg_slide_mode():
    assert default_stride([512, 1024]) == (341, 683)
    grid = window_grid(1024, 2048, [512, 1024])
    assert len(grid) == 9
    assert all(y1 - y0 == 512 and x1 - x0 == 1024 and y1 <= 1024 and x1 <= 2048 for y0, y1, x0, x1 in grid)
    covered = np.zeros((1024, 2048), bool)
    for y0, y1, x0, x1 in grid:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert window_grid(64, 128, [64, 64]) == [(0, 64, 0, 64), (0, 64, 43, 107), (0, 64, 64, 128)]
    # Smaller than the crop: the whole image is one window; a narrow side stays one window wide.
    assert window_grid(40, 50, [64, 64]) == [(0, 40, 0, 50)]
    assert {(y1 - y0, x1 - x0) for y0, y1, x0, x1 in window_grid(40, 200, [64, 64])} == {(40, 64)}
    with pytest.raises(ValueError, match="crop size must be positive"):
        window_grid(10, 10, [0, 64])


def test_slide_on_a_pixelwise_model_equals_whole_inference():
    model = PixelwiseModel().eval()
    images = torch.rand(2, 3, 150, 230) * 255
    with torch.no_grad():
        whole = model(images)
        slid = slide_inference(lambda x, _: model(x), images, [64, 64], max_windows=5)
    assert slid.labels.shape == (2, 150, 230) and slid.probs.shape == whole.probs.shape
    torch.testing.assert_close(slid.probs, whole.probs, rtol=0, atol=1e-6)
    assert torch.equal(slid.labels, whole.labels)


def test_slide_with_a_real_checkpoint_on_a_larger_image(loaded):
    model = loaded.model
    images = torch.rand(1, 3, 96, 200) * 255
    labels = torch.randint(0, loaded.config.num_classes, (1, 96, 200))
    with torch.no_grad():
        out = slide_inference(lambda x, _: model(x), images, loaded.run.crop_size)
        oracle = slide_inference(model.oracle, images, loaded.run.crop_size, labels)
    for result in (out, oracle):
        assert result.labels.shape == (1, 96, 200) and result.confidence.shape == (1, 96, 200)
        # Overlaps are averaged, not summed: still a distribution at every pixel.
        torch.testing.assert_close(result.probs.sum(dim=1), torch.ones(1, 96, 200), rtol=0, atol=1e-5)
        assert torch.equal(result.labels, result.probs.argmax(dim=1))
    assert out.expert_weights.shape == (1, model.num_experts, 96, 200)


def test_slide_equals_whole_when_the_crop_covers_the_image(loaded, whole_metrics):
    model, config, stats = loaded.model, loaded.run, loaded.class_stats
    dataset = get_dataset(config, "val")
    images, labels = (torch.stack(t) for t in zip(*[dataset[i] for i in range(2)], strict=True))
    with torch.no_grad():
        whole, slid = model(images), slide_inference(lambda x, _: model(x), images, [64, 128])
        assert torch.equal(slid.probs, whole.probs)
        assert torch.equal(
            slide_inference(model.oracle, images, [80, 160], labels).labels, model.oracle(images, labels).labels
        )
    covering = config.replace(crop_size=[64, 128])
    assert evaluate.evaluate(model, dataset, torch.device("cpu"), covering, stats, slide=True) == whole_metrics


def test_cli_slide_writes_metrics_markdown_and_plot(tmp_path, checkpoint):
    out = tmp_path / "results" / "metrics.json"
    assert evaluate.main(["--checkpoint", str(checkpoint), "--out", str(out), "--slide"]) == 0
    metrics = json.loads(out.read_text())
    assert {"aAcc", "mIoU", "mAcc", "groups", "per_class", "oracle"} <= set(metrics)
    markdown = (tmp_path / "results" / "metrics.md").read_text()
    assert "sliding window 64x64, stride 43x43" in markdown and "| medoe (oracle) |" in markdown
    assert "![per-class IoU and Acc](metrics_per_class.png)" in markdown
    assert markdown.count("| road |") == 1 and markdown.index("| road |") < markdown.index("| bicycle |")
    png = cv2.imread(str(plot_path(out)))
    assert png is not None and png.shape[0] >= 300 and png.shape[1] >= 600
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.json", "metrics.md", "metrics_per_class.png"]


def test_cli_whole_mode_and_no_plot(tmp_path, checkpoint):
    out = tmp_path / "m.json"
    assert evaluate.main(["--checkpoint", str(checkpoint), "--out", str(out), "--no-plot"]) == 0
    assert "whole image" in (tmp_path / "m.md").read_text()
    assert not plot_path(out).exists()


def test_plot_comparison_and_bad_class_counts(tmp_path, loaded, whole_metrics):
    metrics, other = json.loads(json.dumps(whole_metrics)), json.loads(json.dumps(whole_metrics))
    for row in other["per_class"]:
        row["Acc"] = None if row["Acc"] is None else 100 - row["Acc"]
    path = plot_comparison({"baseline": metrics, "medoe": other}, loaded.class_stats, tmp_path / "cmp.png")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[1] > image.shape[0] > 300
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    metrics["per_class"] = metrics["per_class"][:3]
    with pytest.raises(ValueError, match="metrics have 3 classes"):
        plot_per_class(metrics, loaded.class_stats, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="at least one run"):
        plot_comparison({}, loaded.class_stats, tmp_path / "empty.png")


def test_missing_checkpoint_exits_2_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training.evaluate", "--checkpoint", "absent", "--out", "m.json", "--slide"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == ["error: checkpoint directory not found: absent"]


def test_in_process_errors_are_one_line(tmp_path, checkpoint, capsys):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(checkpoint, bare)
    (bare / "class_stats.json").unlink()
    blocker = tmp_path / "file"
    blocker.write_text("")
    for argv, message in [
        (["--checkpoint", str(bare), "--out", str(tmp_path / "m.json")], "has no class_stats.json"),
        (
            ["--checkpoint", str(checkpoint), "--out", str(blocker / "m.json"), "--no-plot"],
            "error: cannot write results",
        ),
    ]:
        assert evaluate.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
