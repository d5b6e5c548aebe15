"""Every config field's type and range is checked when a config is read, before any work:
through the loader, the dataclass itself, a checkpoint's config.json and the training CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from medoe.checkpoint import CheckpointError, load_checkpoint
from medoe.config import CONFIG_DIR, TrainConfig, load_config
from training import train

ROOT = Path(__file__).resolve().parents[1]

# (field, bad value); each must be refused naming the field.
BAD_VALUES = [
    ("iters", "many"),
    ("iters", -5),
    ("iters", 0),
    ("iters", 2.5),
    ("iters", True),
    ("iters", None),
    ("lr", "0.05"),
    ("lr", 0),
    ("lr", -0.1),
    ("lr", float("nan")),
    ("lr", False),
    ("stage2_lr", 0.0),
    ("stage2_iters", -1),
    ("batch_size", 0),
    ("num_workers", -1),
    ("seed", -1),
    ("alpha", 1.5),
    ("alpha", -0.1),
    ("dropout", 1.0),
    ("momentum", 1.0),
    ("weight_decay", -1e-4),
    ("poly_power", -1),
    ("focal_gamma", -2),
    ("select_balance_power", -0.5),
    ("amp", "false"),
    ("amp", 1),
    ("select_balance", "yes"),
    ("stage2_loss", "mixture"),
    ("kl_support", "batch"),
    ("model", 3),
    ("model", "unet"),
    ("backbone", "resnet34"),
    ("optimizer", "adam"),
    ("dataset", "imagenet"),
    ("output_stride", 32),
    ("num_experts", 1),
    ("num_classes", 1),
    ("decoder_channels", 0),
    ("decision_hidden", 0),
    ("group_thresholds", 0.8),
    ("group_thresholds", [0.95, 0.8]),
    ("group_thresholds", [0.8, 1.0]),
    ("group_thresholds", [0.8, "0.95"]),
    ("crop_size", [512]),
    ("crop_size", [512, "1024"]),
    ("crop_size", [0, 64]),
    ("crop_size", "512x512"),
    ("synthetic_size", [64, -1]),
    ("synthetic_train_images", 0),
    ("synthetic_val_images", 0),
    ("class_names", "road"),
    ("class_names", [1, 2]),
    ("palette", [[0, 0, 256]] * 19),
    ("palette", [[0, 0]] * 19),
    ("mean", [1, 2]),
    ("std", [1, 0, 1]),
    ("ignore_index", 300),
    ("ignore_index", 3),
    ("pretrained", 0),
    ("data_root", ["a"]),
]


def write(tmp_path, values: dict) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(values))
    return path


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.json")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_round_trips(path):
    config = load_config(str(path))
    assert TrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert load_config(path.stem) == config


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=lambda v: repr(v))
def test_the_loader_refuses_a_bad_value_naming_the_field(tmp_path, field, value):
    path = write(tmp_path, {field: value})
    with pytest.raises(ValueError) as error:
        load_config(str(path))
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert f"{field}=" in message and "expected" in message and str(path) in message, message


@pytest.mark.parametrize("field, value", [("iters", "many"), ("lr", "0.05"), ("alpha", 2.0), ("amp", "no")])
def test_the_dataclass_refuses_a_bad_value(field, value):
    with pytest.raises(ValueError, match=f"^invalid config: {field}="):
        TrainConfig(**{field: value})


def test_the_message_names_value_and_expectation(tmp_path):
    with pytest.raises(ValueError, match=r"iters='many', expected an integer >= 1$"):
        load_config(str(write(tmp_path, {"iters": "many"})))
    with pytest.raises(ValueError, match=r"lr='0.05', expected a finite number > 0$"):
        load_config(str(write(tmp_path, {"lr": "0.05"})))
    with pytest.raises(ValueError, match=r"crop_size=\[512, '1024'\], expected a list of 2 integers >= 1$"):
        load_config(str(write(tmp_path, {"crop_size": [512, "1024"]})))


def test_an_int_is_fine_for_a_float_field(tmp_path):
    config = load_config(str(write(tmp_path, {"lr": 1, "alpha": 0, "group_thresholds": [0.5, 0.75]})))
    assert config.lr == 1 and config.alpha == 0


def test_an_unknown_key_is_refused_with_a_suggestion(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field 'itres' \(did you mean 'iters'\?\)"):
        load_config(str(write(tmp_path, {"itres": 5})))
    with pytest.raises(ValueError, match=r"unknown field 'zzz'$"):
        load_config(str(write(tmp_path, {"zzz": 5})))


def test_a_checkpoint_config_is_checked_too(tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    (checkpoint / "config.json").write_text(json.dumps({"iters": -5}))
    with pytest.raises(CheckpointError, match=r"iters=-5, expected an integer >= 1"):
        load_checkpoint(checkpoint)


def test_a_bad_cli_override_exits_2_before_any_work(tmp_path, capsys):
    work = tmp_path / "w"
    assert train.main(["--config", "deeplabv3plus_tiny_synthetic_cpu", "--work-dir", str(work), "--iters", "-5"]) == 2
    assert capsys.readouterr().err.strip() == "error: invalid config: iters=-5, expected an integer >= 1"
    assert not work.exists()


@pytest.mark.parametrize(
    "values, field",
    [({"iters": "many"}, "iters"), ({"lr": "0.05"}, "lr"), ({"iters": -5}, "iters"), ({"batch_sise": 2}, "batch_sise")],
)
def test_the_training_cli_exits_2_with_one_line_before_any_work(tmp_path, values, field):
    path, work = write(tmp_path, values), tmp_path / "w"
    result = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(path), "--work-dir", str(work)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and field in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not work.exists()  # refused before the work directory, the dataset or the class statistics


def test_the_dataset_choices_are_the_loaders():
    from medoe import config
    from medoe.data import DATASETS

    assert config.DATASETS == tuple(DATASETS)


def test_the_benchmark_refuses_a_bad_config_before_training(tmp_path, capsys):
    from bench import longtail as benchmark

    work = tmp_path / "w"
    path = write(tmp_path, {"lr": "0.05"})
    assert benchmark.main(["--config", str(path), "--work-dir", str(work), "--out-dir", str(tmp_path / "docs")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: invalid config: lr='0.05', expected a finite number > 0"
    assert not work.exists()


@pytest.mark.parametrize("domain", ["streets", "aerial"])
def test_every_benchmark_run_is_a_valid_training_command(domain):
    # A misspelt flag or a value a field refuses would otherwise surface only inside a long benchmark.
    from bench import longtail as benchmark

    runs = {**benchmark.BASELINES, **benchmark.MEDOE_RUNS}
    configs = {}
    for name, flags in runs.items():
        config = train.config_from_args(
            train.get_args(["--config", benchmark.DOMAINS[domain], "--work-dir", "w", *flags])
        )
        config.validate()
        configs[name] = config
    assert configs["medoe_reweighted_kl_refine"].kl_support == "present" and configs["medoe_paper"].kl_support == "set"
    assert configs["medoe_reweighted_noaux_refine"].alpha == 0
    assert configs["medoe_reweighted_refine"].network.mixing == "refine"
    # The shipped recipe (the configs' own, `medoe`) is the variant docs/method.md chose on `val`.
    assert configs["medoe"] == configs["medoe_reweighted_e1ce_blend"]
    # A run that shares another's stage 1 differs from it in stage-2 fields only.
    stage2 = {*train.STAGE2_RUN_FIELDS, *train.STAGE2_NETWORK_FIELDS}
    for name, source in benchmark.SHARES_STAGE1.items():
        a, b = configs[name].to_dict(), configs[source].to_dict()
        assert {k for k in a if a[k] != b[k]} <= stage2, name


def test_the_papers_runs_stay_the_papers_whatever_the_configs_defaults(tmp_path):
    from bench import longtail as benchmark

    shipped = json.loads((CONFIG_DIR / f"{benchmark.DOMAINS['streets']}.json").read_text())
    recipe = {"expert_reweight": True, "expert1_aux": False, "kl_support": "present", "stage2_loss": "output"}
    path = tmp_path / "changed.json"
    path.write_text(json.dumps({**shipped, **recipe, "mixing": "refine"}))
    for name in ("medoe_paper", "medoe_nested", "medoe_levers"):
        flags = benchmark.MEDOE_RUNS[name]
        config = train.config_from_args(train.get_args(["--config", str(path), "--work-dir", "w", *flags]))
        assert (config.expert_reweight, config.expert1_aux, config.kl_support, config.stage2_loss) == (
            False,
            True,
            "set",
            "selection",
        ), name
    assert config.network.mixing == "nested"  # medoe_levers' own lever
