"""Checkpoints rebuild the model from the directory alone, atomically written, safely read."""

import pickle

import pytest
import torch

from medoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medoe.class_stats import ClassStats
from medoe.config import ModelConfig, TrainConfig
from medoe.model import build_model


def make(model_type="medoe"):
    config = ModelConfig(
        model=model_type,
        backbone="tiny",
        context="ppm",
        num_classes=4,
        decoder_channels=16,
        decision_hidden=8,
        class_names=list("abcd"),
        palette=[[i, i, i] for i in range(4)],
    )
    torch.manual_seed(0)
    model = build_model(config).eval()
    if model_type == "medoe":
        model.set_groups([[0], [1], [2, 3]])
    stats = ClassStats(class_names=list("abcd"), pixel_counts=[80, 15, 3, 2], image_counts=[2, 2, 1, 1], num_images=2)
    return model, stats


@pytest.mark.parametrize("model_type", ["medoe", "baseline"])
def test_round_trip_gives_identical_outputs(tmp_path, model_type):
    model, stats = make(model_type)
    save_checkpoint(tmp_path / "ckpt", model, stats)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == model.config and loaded.class_stats == stats
    images = torch.rand(1, 3, 40, 56) * 255
    with torch.no_grad():
        assert torch.equal(model(images).probs, loaded.model(images).probs)
    if model_type == "medoe":
        assert loaded.model.groups() == [[0], [1], [2, 3]]


def test_overwrite_leaves_no_staging_directories(tmp_path):
    model, stats = make()
    save_checkpoint(tmp_path / "ckpt", model, stats)
    save_checkpoint(tmp_path / "ckpt", model, stats, {"iter": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_checkpoint(tmp_path / "ckpt", train_state=True).train_state == {"iter": 3}


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, stats = make()
    save_checkpoint(tmp_path / "ckpt", model, stats, {"iter": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("medoe.checkpoint.torch.save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "ckpt", model, stats, {"iter": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert load_checkpoint(tmp_path / "ckpt", train_state=True).train_state == {"iter": 1}


def test_corrupt_weights_are_a_clear_error(tmp_path):
    model, stats = make()
    save_checkpoint(tmp_path / "ckpt", model, stats)
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ckpt")


def test_config_that_does_not_match_the_weights(tmp_path):
    model, stats = make()
    save_checkpoint(tmp_path / "ckpt", model, stats)
    TrainConfig(network=model.config.replace(num_classes=5, class_names=[], palette=[])).save(
        tmp_path / "ckpt" / "config.json"
    )
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        load_checkpoint(tmp_path / "ckpt")


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(tmp_path / "empty")


class RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, stats = make()
    save_checkpoint(tmp_path / "ckpt", model, stats, {"iter": 1})
    (tmp_path / "ckpt" / "train_state.pt").write_bytes(pickle.dumps({"iter": RunsCode()}))
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "ckpt", train_state=True)
    assert not (tmp_path / "PWNED").exists()
