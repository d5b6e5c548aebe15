import json

import numpy as np
import pytest
import torch

from medoe.data.aerial import SyntheticAerial
from medoe.data.aerial import main as aerial_main
from medoe.data.folder import FolderDataset
from medoe.data.generated import _groups

NAMES = ["bare ground", "grass", "road", "building", "tree", "water", "car", "swimming pool", "boat", "solar panel"]


@pytest.fixture(scope="module")
def train_stats():
    """Pixel shares, groups and per-image presence over 100 train images at 256x512 (labels only)."""
    ds = SyntheticAerial(num_images=100, height=256, width=512, seed=0)
    counts, presence = np.zeros(ds.num_classes), np.zeros(ds.num_classes)
    for i in range(len(ds)):
        per_image = np.bincount(ds.label_map(i).ravel(), minlength=256)
        assert per_image[ds.num_classes :].sum() == 0  # every pixel is one of the 10 classes
        counts += per_image[: ds.num_classes]
        presence += per_image[: ds.num_classes] > 0
    shares = counts / counts.sum()
    groups = {g: {NAMES[i] for i in idx} for g, idx in _groups(shares).items()}
    return dict(zip(NAMES, shares, strict=True)), groups, dict(zip(NAMES, presence / len(ds), strict=True))


def test_classes_and_palette():
    ds = SyntheticAerial(num_images=1, height=32, width=64)
    assert ds.class_names == NAMES and ds.num_classes == 10
    assert ds.palette[0] == (150, 130, 100) and ds.palette[9] == (120, 0, 160) and len(ds.palette) == 10


def test_designed_long_tail(train_stats):
    shares, groups, presence = train_stats
    assert groups == {
        "head": {"bare ground", "grass", "road", "building"},
        "body": {"tree", "water"},
        "tail": {"car", "swimming pool", "boat", "solar panel"},
    }, shares
    assert all(shares[name] < 0.015 for name in groups["tail"]), shares
    assert shares["boat"] < 0.005 and shares["solar panel"] < 0.005, shares
    assert sum(shares[name] for name in groups["tail"]) < 0.05
    # Rare but learnable: each tail class shows up in a fair share of images, not in all of them.
    assert all(presence[name] >= 0.2 for name in groups["tail"]), presence
    assert presence["boat"] < 0.8 and min(presence[name] for name in groups["tail"]) < 1.0, presence


def test_deterministic_across_instances():
    def sample(seed=0, split="train", index=3):
        return SyntheticAerial(num_images=5, height=64, width=128, seed=seed, split=split).load(index)

    image, label = sample()
    image2, label2 = sample()
    assert image.tobytes() == image2.tobytes() and label.tobytes() == label2.tobytes()
    for other in (sample(seed=1), sample(split="val"), sample(split="extra"), sample(index=4)):
        assert image.tobytes() != other[0].tobytes() and label.tobytes() != other[1].tobytes()


def test_splits_share_no_image():
    train = SyntheticAerial(num_images=10, height=32, width=64, split="train")
    val = SyntheticAerial(num_images=10, height=32, width=64, split="val")
    test = SyntheticAerial(num_images=10, height=32, width=64, split="test")
    seen = [{ds.load(i)[0].tobytes() for i in range(len(ds))} for ds in (train, val, test)]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])


@pytest.mark.parametrize("size", [(256, 512), (97, 203), (40, 30), (8, 8)])
def test_shapes_dtypes_and_label_map(size):
    ds = SyntheticAerial(num_images=3, height=size[0], width=size[1], seed=2, split="test")
    for i in range(len(ds)):
        image, label = ds.load(i)
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        assert label.shape == size and label.dtype == np.uint8
        assert int(label.max()) < ds.num_classes
        np.testing.assert_array_equal(ds.label_map(i), label)  # the cheap path draws the same label
    image_t, label_t = ds[0]
    assert image_t.dtype == torch.float32 and image_t.shape == (3, *size)
    assert label_t.dtype == torch.int64 and label_t.shape == size
    assert ds.sample_name(1) == "aerial_test_000001"


def test_cli_stats_and_out(tmp_path, capsys):
    assert aerial_main(["--stats", "--json", "--num", "4", "--height", "64", "--width", "128"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["classes"] == NAMES and set(stats["groups"]) == {"head", "body", "tail"}
    assert abs(sum(stats["pixel_share"]) - 1.0) < 1e-4
    assert aerial_main(["--out", str(tmp_path), "--num", "2", "--height", "48", "--width", "96", "--split", "val"]) == 0
    folder, aerial = FolderDataset(tmp_path, split="val"), SyntheticAerial(2, 48, 96, split="val")
    assert folder.class_names == aerial.class_names and folder.palette == aerial.palette
    for i in range(2):
        np.testing.assert_array_equal(folder.load(i)[0], aerial.load(i)[0])
        np.testing.assert_array_equal(folder.load(i)[1], aerial.load(i)[1])


def test_bad_arguments():
    for kwargs in ({"height": 4}, {"width": 7}, {"num_images": -1}):
        with pytest.raises(ValueError, match="SyntheticAerial needs num_images >= 0 and size >= 8x8"):
            SyntheticAerial(**{"num_images": 1, **kwargs})
    with pytest.raises(IndexError):
        SyntheticAerial(num_images=2).load(2)
