import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from cityscapesscripts.helpers.labels import name2label

from medoe.data import FolderDataset, SyntheticStreets
from medoe.data.generated import pixel_stats
from medoe.data.synthetic import main as synthetic_main


@pytest.fixture(scope="module")
def train_stats():
    """Shares, groups and per-image presence over 200 train images at 256x512 (labels only)."""
    ds = SyntheticStreets(num_images=200, height=256, width=512, seed=0)
    presence = np.zeros(ds.num_classes)
    for i in range(len(ds)):
        presence += np.bincount(ds.label_map(i).ravel(), minlength=256)[: ds.num_classes] > 0
    stats = pixel_stats(ds)
    shares = dict(zip(stats["classes"], stats["pixel_share"], strict=True))
    return shares, stats["groups"], dict(zip(ds.class_names, presence / len(ds), strict=True))


def test_long_tail(train_stats):
    shares, groups, presence = train_stats
    assert abs(sum(shares.values()) - 1.0) < 1e-4
    assert sum(sorted(shares.values(), reverse=True)[:3]) >= 0.75
    assert all(groups[g] for g in ("head", "body", "tail"))
    assert sorted(groups["head"] + groups["body"] + groups["tail"]) == sorted(shares)
    assert len(groups["tail"]) >= 3
    assert sum(shares[name] for name in groups["tail"]) <= 0.05
    # Every tail class shows up often enough to be learnable.
    assert all(presence[name] >= 0.15 for name in groups["tail"]), presence


def test_group_rule(train_stats):
    shares, groups, _ = train_stats
    ranked = sorted(shares, key=shares.get, reverse=True)
    assert ranked[: len(groups["head"])] == groups["head"]
    head_share = sum(shares[n] for n in groups["head"])
    assert head_share >= 0.80 and head_share - shares[groups["head"][-1]] < 0.80


def test_cityscapes_names_and_colours():
    ds = SyntheticStreets(num_images=1, height=32, width=64)
    assert ds.num_classes == len(ds.class_names) == len(ds.palette) >= 12
    assert ds.ignore_index == 255
    train_ids = [name2label[name].trainId for name in ds.class_names]
    assert train_ids == sorted(train_ids) and 255 not in train_ids
    assert ds.palette == [tuple(name2label[name].color) for name in ds.class_names]
    for name in (
        "road",
        "sidewalk",
        "building",
        "wall",
        "pole",
        "traffic light",
        "traffic sign",
        "vegetation",
        "sky",
        "person",
        "car",
        "bicycle",
    ):
        assert name in ds.class_names


def test_deterministic_and_seed_split_sensitive():
    def sample(seed=0, split="train", index=3):
        return SyntheticStreets(num_images=5, height=64, width=128, seed=seed, split=split).load(index)

    image, label = sample()
    image2, label2 = sample()
    assert image.tobytes() == image2.tobytes() and label.tobytes() == label2.tobytes()
    for other in (sample(seed=1), sample(split="val"), sample(index=4)):
        assert image.tobytes() != other[0].tobytes() and label.tobytes() != other[1].tobytes()


def test_splits_share_no_image():
    train = SyntheticStreets(num_images=20, height=32, width=64, split="train")
    val = SyntheticStreets(num_images=20, height=32, width=64, split="val")
    train_bytes = {train.load(i)[0].tobytes() for i in range(len(train))}
    assert not train_bytes & {val.load(i)[0].tobytes() for i in range(len(val))}


@pytest.mark.parametrize("size", [(97, 203), (256, 512), (40, 30)])
def test_any_resolution(size):
    ds = SyntheticStreets(num_images=4, height=size[0], width=size[1], seed=2, split="test")
    for i in range(len(ds)):
        image, label = ds.load(i)
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        assert label.shape == size and label.dtype == np.uint8
        assert set(np.unique(label).tolist()) <= set(range(ds.num_classes)) | {255}
        np.testing.assert_array_equal(ds.label_map(i), label)  # label-only path agrees
    image_t, label_t = ds[0]
    assert image_t.dtype == torch.float32 and image_t.shape == (3, *size)
    assert label_t.dtype == torch.int64 and label_t.shape == size
    assert ds.sample_name(1) == "synthetic_test_000001"


def test_label_values_in_range_over_many_images():
    ds = SyntheticStreets(num_images=60, height=128, width=256, seed=4)
    seen = set()
    for i in range(len(ds)):
        values = set(np.unique(ds.label_map(i)).tolist())
        assert values <= set(range(ds.num_classes)) | {255}
        seen |= values
    assert seen == set(range(ds.num_classes))  # every class appears somewhere


def test_context_needed_colours_overlap():
    # The same colour range is used by several classes: a per-pixel colour classifier cannot win.
    ds = SyntheticStreets(num_images=30, height=128, width=256, seed=0)
    grey = {name: 0 for name in ("building", "wall", "pole", "sidewalk", "sky", "road")}
    for i in range(len(ds)):
        image, label = ds.load(i)
        rgb = image.astype(int)
        is_grey = (np.ptp(rgb, axis=2) < 20) & (rgb.mean(axis=2) > 90) & (rgb.mean(axis=2) < 170)
        for name in grey:
            grey[name] += int((is_grey & (label == ds.class_names.index(name))).sum())
    assert all(count > 0 for count in grey.values()), grey


def test_stats_cli_json():
    cmd = [sys.executable, "-m", "medoe.data.synthetic", "--stats", "--num", "200", "--json"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    stats = json.loads(result.stdout)
    assert set(stats) == {"classes", "pixel_share", "groups"}
    assert len(stats["classes"]) == len(stats["pixel_share"]) == len(SyntheticStreets.class_names)
    assert set(stats["groups"]) == {"head", "body", "tail"}
    assert "RuntimeWarning" not in result.stderr


def test_out_writes_folder_dataset(tmp_path, capsys):
    assert (
        synthetic_main(["--out", str(tmp_path), "--num", "3", "--height", "48", "--width", "96", "--split", "val"]) == 0
    )
    folder = FolderDataset(tmp_path, split="val")
    synthetic = SyntheticStreets(num_images=3, height=48, width=96, split="val")
    assert folder.class_names == synthetic.class_names and folder.palette == synthetic.palette
    for i in range(3):
        assert folder.sample_name(i) == synthetic.sample_name(i)
        np.testing.assert_array_equal(folder.load(i)[0], synthetic.load(i)[0])
        np.testing.assert_array_equal(folder.load(i)[1], synthetic.load(i)[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="SyntheticStreets"):
        SyntheticStreets(num_images=1, height=4, width=64)
    with pytest.raises(IndexError):
        SyntheticStreets(num_images=2).load(2)
