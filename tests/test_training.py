"""The training and evaluation commands, end to end on a small synthetic config."""

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from medoe.data import SyntheticStreets
from medoe.metrics import ConfusionMatrix
from tests.data_fixtures import write_small_config
from training import evaluate, train


@pytest.fixture
def config_path(tmp_path):
    return str(write_small_config(tmp_path / "small.json"))


def read_log(work_dir):
    return [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]


def test_medoe_runs_both_stages_then_evaluates(tmp_path, config_path):
    work = tmp_path / "run"
    assert train.main(["--config", config_path, "--work-dir", str(work), "--iters", "4", "--stage2-iters", "2"]) == 0
    log = read_log(work)
    assert [(r["stage"], r["iter"]) for r in log] == [(1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2)]
    assert all(np.isfinite(r["loss"]) for r in log) and {"expert1", "expert2", "expert3"} <= set(log[0])
    for name in ("stage1", "final", "last"):
        assert (work / name / "model.safetensors").is_file() and (work / name / "class_stats.json").is_file()
    metrics = json.loads((work / "metrics.json").read_text())
    assert {"aAcc", "mIoU", "mAcc", "groups", "per_class", "oracle"} <= set(metrics)
    assert set(metrics["groups"]) == {"head", "body", "tail"}
    assert [c["name"] for c in metrics["per_class"]] == SyntheticStreets(num_images=1).class_names


@pytest.mark.parametrize("model", ["baseline", "focal", "reweight"])
def test_baselines_train(tmp_path, config_path, model):
    work = tmp_path / model
    assert (
        train.main(["--config", config_path, "--model", model, "--work-dir", str(work), "--iters", "2", "--no-eval"])
        == 0
    )
    assert [r["iter"] for r in read_log(work)] == [1, 2]
    assert json.loads((work / "final" / "config.json").read_text())["model"] == model


def test_resume_repeats_the_uninterrupted_losses(tmp_path, config_path):
    common = ["--config", config_path, "--iters", "6", "--stage2-iters", "2", "--no-eval"]
    assert train.main([*common, "--work-dir", str(tmp_path / "straight")]) == 0
    assert train.main([*common, "--work-dir", str(tmp_path / "split"), "--stop-after", "3"]) == 0
    assert not (tmp_path / "split" / "final").exists()
    assert train.main([*common, "--work-dir", str(tmp_path / "split"), "--resume"]) == 0
    straight, split = read_log(tmp_path / "straight"), read_log(tmp_path / "split")
    assert [(r["stage"], r["iter"]) for r in split] == [(r["stage"], r["iter"]) for r in straight]
    np.testing.assert_allclose([r["loss"] for r in split], [r["loss"] for r in straight], rtol=0, atol=1e-6)


def test_saved_predictions_recompute_the_metrics(tmp_path, config_path):
    work = tmp_path / "run"
    assert (
        train.main(
            ["--config", config_path, "--work-dir", str(work), "--iters", "2", "--stage2-iters", "1", "--no-eval"]
        )
        == 0
    )
    out, preds = tmp_path / "metrics.json", tmp_path / "preds"
    assert evaluate.main(["--checkpoint", str(work / "final"), "--out", str(out), "--save-preds", str(preds)]) == 0
    dataset = SyntheticStreets(num_images=4, height=64, width=128, seed=0, split="val")
    matrix = ConfusionMatrix(dataset.num_classes)
    for i in range(len(dataset)):
        prediction = cv2.imread(str(preds / f"{dataset.sample_name(i)}.png"), cv2.IMREAD_UNCHANGED)
        matrix.update(prediction.astype(np.int64), dataset.label_map(i).astype(np.int64))
    recomputed = matrix.compute().to_dict(dataset.class_names)
    assert recomputed["mIoU"] == pytest.approx(json.loads(out.read_text())["mIoU"])


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["-m", "training.train", "--config", "no_such_config", "--work-dir", "w"],
            "config 'no_such_config' not found",
        ),
        (["-m", "training.train", "--dataset", "cityscapes", "--work-dir", "w"], "needs --data-root"),
        (["-m", "training.train", "--dataset", "folder", "--data-root", "absent", "--work-dir", "w"], "absent"),
        (["-m", "training.evaluate", "--checkpoint", "absent", "--out", "m.json"], "checkpoint directory not found"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(__import__("pathlib").Path.cwd()), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_warmup_ramps_linearly_then_poly_decays():
    from training.train import WARMUP_START, scheduled_lr

    assert scheduled_lr(1.0, 0, 100, 0.9, 10) == pytest.approx(WARMUP_START)
    assert scheduled_lr(1.0, 5, 100, 0.9, 10) == pytest.approx((0.95**0.9) * (0.5 + 0.5 * WARMUP_START))
    assert scheduled_lr(1.0, 10, 100, 0.9, 10) == pytest.approx(0.9**0.9)  # warm-up over: poly alone
    assert scheduled_lr(1.0, 0, 100, 0.9, 0) == 1.0


def test_head_lr_mult_gives_the_backbone_its_own_group():
    from medoe.config import ModelConfig
    from medoe.model import build_model
    from training.train import parameter_groups

    model = build_model(ModelConfig(backbone="tiny", num_classes=4, decoder_channels=8))
    (single,) = parameter_groups(model, 1.0)
    backbone, head = parameter_groups(model, 10.0)
    assert len(single["params"]) == len(backbone["params"]) + len(head["params"])
    assert {id(p) for p in backbone["params"]} == {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert (backbone["lr_mult"], head["lr_mult"]) == (1.0, 10.0) and head["params"]


def test_a_segformer_medoe_trains_with_the_transformer_recipe_and_evaluates(tmp_path):
    config = write_small_config(
        tmp_path / "mit.json",
        backbone="mit_b0",
        context="mlp",
        optimizer="adamw",
        lr=6e-4,
        weight_decay=0.01,
        head_lr_mult=10.0,
        warmup_iters=2,
    )
    work = tmp_path / "run"
    assert train.main(["--config", str(config), "--work-dir", str(work), "--iters", "3", "--stage2-iters", "1"]) == 0
    log = read_log(work)
    assert [(r["stage"], r["iter"]) for r in log] == [(1, 1), (1, 2), (1, 3), (2, 1)]
    assert log[0]["lr"] < log[1]["lr"] and all(np.isfinite(r["loss"]) for r in log)  # warming up
    assert {"mIoU", "groups", "oracle"} <= set(json.loads((work / "metrics.json").read_text()))


def test_an_hrnet_ocrnet_medoe_trains_and_evaluates(tmp_path):
    # OCRNet on HRNetV2 (the paper's pair): the OCR head and the light experts read the stride-4 concatenation.
    config = write_small_config(tmp_path / "hrnet.json", backbone="hrnet_w18_small", context="ocr")
    work = tmp_path / "run"
    assert train.main(["--config", str(config), "--work-dir", str(work), "--iters", "2", "--stage2-iters", "1"]) == 0
    log = read_log(work)
    assert [(r["stage"], r["iter"]) for r in log] == [(1, 1), (1, 2), (2, 1)]
    assert all(np.isfinite(r["loss"]) for r in log)
    assert json.loads((work / "final" / "config.json").read_text())["backbone"] == "hrnet_w18_small"
    assert {"mIoU", "groups", "oracle"} <= set(json.loads((work / "metrics.json").read_text()))
