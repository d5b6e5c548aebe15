import random
import re

import numpy as np
import pytest
import torch

from medoe.data import (
    ADE20KDataset,
    CityscapesDataset,
    DatasetError,
    FolderDataset,
    build_dataset,
    train_transform,
)
from medoe.data.ade20k import CLASS_NAMES as ADE_NAMES
from medoe.data.ade20k import PALETTE as ADE_PALETTE
from tests.data_fixtures import (
    CITYSCAPES_ID_TO_TRAIN,
    make_ade20k,
    make_cityscapes,
    make_folder,
    mask_from_values,
    rgb_image,
    write_garbage,
    write_mask,
    write_rgb,
)


def check_sample(dataset, index, height, width):
    image, label = dataset[index]
    assert image.dtype == torch.float32 and image.shape == (3, height, width)
    assert label.dtype == torch.int64 and label.shape == (height, width)
    assert 0 <= image.min() and image.max() <= 255
    # Fixture images have R~10, G~120, B~230: RGB order, not normalised.
    assert image[0].mean() < 30 and 100 < image[1].mean() < 140 and image[2].mean() > 210
    return image, label


# ---------------------------------------------------------------- Cityscapes


def test_cityscapes_layout_mapping_and_names(tmp_path):
    stems = make_cityscapes(tmp_path)
    ds = CityscapesDataset(tmp_path, split="val")
    assert len(ds) == 4 and ds.split == "val"
    assert [ds.sample_name(i) for i in range(len(ds))] == stems
    assert ds.sample_name(0) == "aachen_000000_000019"
    assert ds.num_classes == 19 and len(ds.palette) == 19 and ds.ignore_index == 255
    assert ds.class_names[0] == "road" and ds.palette[0] == (128, 64, 128)
    assert ds.class_names[13] == "car" and ds.class_names[18] == "bicycle"
    raw = mask_from_values(list(CITYSCAPES_ID_TO_TRAIN), 8, 16)
    expected = np.vectorize(CITYSCAPES_ID_TO_TRAIN.get)(raw).astype(np.uint8)
    np.testing.assert_array_equal(ds.label_map(0), expected)
    image, label = check_sample(ds, 0, 8, 16)
    np.testing.assert_array_equal(label.numpy(), expected)
    assert set(np.unique(ds.label_map(1))) == {0, 1, 11, 13, 18, 255}


def test_cityscapes_missing_label_and_empty_root(tmp_path):
    make_cityscapes(tmp_path, cities=("aachen",), per_city=1)
    (tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png").unlink()
    with pytest.raises(DatasetError, match="aachen_000000_000019_leftImg8bit.png"):
        CityscapesDataset(tmp_path, split="val")
    with pytest.raises(DatasetError, match=r"no samples.*empty.*leftImg8bit/train"):
        CityscapesDataset(tmp_path / "empty", split="train")


# ---------------------------------------------------------------- ADE20K


def test_ade20k_names_palette():
    assert len(ADE_NAMES) == 150 and len(set(ADE_NAMES)) == 150
    assert ADE_NAMES[:6] == ["wall", "building", "sky", "floor", "tree", "ceiling"]
    assert ADE_NAMES[7] == "bed" and ADE_NAMES[12] == "person" and ADE_NAMES[20] == "car"
    assert ADE_NAMES[-2:] == ["clock", "flag"] and ADE_NAMES[127] == "bicycle"
    assert len(ADE_PALETTE) == 150 and ADE_PALETTE[0] == (120, 120, 120)
    assert ADE_PALETTE[-1] == (92, 0, 255)


@pytest.mark.parametrize("nested", [True, False])
def test_ade20k_mapping(tmp_path, nested):
    ade = make_ade20k(tmp_path)
    ds = ADE20KDataset(tmp_path if nested else ade, split="val")
    assert len(ds) == 2 and ds.num_classes == 150
    assert ds.sample_name(0) == "ADE_val_00000001"
    raw = mask_from_values((0, 1, 2, 75, 150), 8, 12)
    expected = np.where(raw == 0, 255, raw.astype(np.int64) - 1)
    np.testing.assert_array_equal(ds.label_map(1), expected)
    image, label = ds[0]
    assert image.shape == (3, 8, 12) and label.dtype == torch.int64
    np.testing.assert_array_equal(label.numpy(), expected)


def test_ade20k_bad_value_and_split(tmp_path):
    make_ade20k(tmp_path, split_dir="training", count=1, values=(0, 1, 151))
    ds = ADE20KDataset(tmp_path, split="train")
    with pytest.raises(DatasetError, match=r"ADE_tra_00000001\.png.*150"):
        ds.label_map(0)
    with pytest.raises(DatasetError, match="split"):
        ADE20KDataset(tmp_path, split="test")
    with pytest.raises(DatasetError, match=r"no samples.*images/validation"):
        ADE20KDataset(tmp_path, split="val")


# ---------------------------------------------------------------- folder


def test_folder_png_and_jpg(tmp_path):
    root = make_folder(tmp_path / "data")
    ds = FolderDataset(root, split="train")
    assert ds.class_names == ["background", "road", "car"]  # the blank line is ignored
    assert len(ds) == 2 and [ds.sample_name(i) for i in range(2)] == ["a_png", "b_jpg"]
    assert len(ds.palette) == 3 and len(set(ds.palette)) == 3
    for i in range(2):
        image, label = check_sample(ds, i, 10, 14)
        np.testing.assert_array_equal(label.numpy(), mask_from_values([0, 1, 2, 255], 10, 14))
    image, label = ds.load(0)
    assert image.dtype == np.uint8 and image.shape == (10, 14, 3) and label.dtype == np.uint8
    np.testing.assert_array_equal(image, rgb_image(10, 14))  # PNG: exact, RGB order


def test_folder_palette_file(tmp_path):
    palette = [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    assert FolderDataset(make_folder(tmp_path, palette=palette)).palette == palette
    (tmp_path / "palette.txt").write_text("1 2 3\n")
    with pytest.raises(DatasetError, match="palette.txt"):
        FolderDataset(tmp_path)


def test_folder_missing_classes_and_annotation(tmp_path):
    root = make_folder(tmp_path)
    write_rgb(root / "img_dir/train/orphan.png", rgb_image(10, 14))
    with pytest.raises(DatasetError, match="orphan.png"):
        FolderDataset(root)
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="classes.txt"):
        FolderDataset(root)
    make_folder(tmp_path / "other")
    with pytest.raises(DatasetError, match=r"no samples.*other.*img_dir/val"):
        FolderDataset(tmp_path / "other", split="val")


def test_bad_label_value_names_file(tmp_path):
    root = make_folder(tmp_path)
    write_mask(root / "ann_dir/train/a_png.png", mask_from_values([0, 3, 255], 10, 14))
    ds = FolderDataset(root)
    with pytest.raises(DatasetError, match=r"a_png\.png.*value 3 >= num_classes=3"):
        ds.load(0)
    with pytest.raises(DatasetError, match=r"a_png\.png"):
        ds[0]


def test_size_mismatch_names_both_files(tmp_path):
    root = make_folder(tmp_path)
    write_mask(root / "ann_dir/train/b_jpg.png", mask_from_values([0, 1], 9, 14))
    with pytest.raises(DatasetError, match=r"img_dir/train/b_jpg\.jpg.*10x14.*ann_dir/train/b_jpg\.png.*9x14"):
        FolderDataset(root).load(1)


@pytest.mark.parametrize("which", ["img_dir/train/a_png.png", "ann_dir/train/a_png.png"])
def test_unreadable_file_names_it(tmp_path, which):
    root = make_folder(tmp_path)
    write_garbage(root / which)
    with pytest.raises(DatasetError, match=re.escape(which)):
        FolderDataset(root).load(0)


def test_colour_label_rejected(tmp_path):
    root = make_folder(tmp_path)
    write_rgb(root / "ann_dir/train/a_png.png", rgb_image(10, 14))
    with pytest.raises(DatasetError, match=r"a_png\.png must be single-channel 8-bit"):
        FolderDataset(root).label_map(0)


def test_cityscapes_garbage_image(tmp_path):
    make_cityscapes(tmp_path, cities=("bochum",), per_city=1)
    write_garbage(tmp_path / "leftImg8bit/val/bochum/bochum_000000_000019_leftImg8bit.png")
    with pytest.raises(DatasetError, match="bochum_000000_000019_leftImg8bit.png"):
        CityscapesDataset(tmp_path, split="val").load(0)


# ---------------------------------------------------------------- build_dataset


def test_build_dataset(tmp_path):
    make_folder(tmp_path)
    assert isinstance(build_dataset("folder", tmp_path), FolderDataset)
    synthetic = build_dataset("synthetic", split="val", num_images=3, height=32, width=64)
    assert len(synthetic) == 3 and synthetic.split == "val"
    with pytest.raises(ValueError, match="synthetic, aerial, cityscapes, ade20k, folder"):
        build_dataset("pascal", tmp_path)
    with pytest.raises(DatasetError, match="root"):
        build_dataset("cityscapes", None)


# ---------------------------------------------------------------- transforms


def sample_pair(height=60, width=90):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.zeros((height, width), np.uint8)
    label[:, width // 3 :] = 4
    label[height // 2 :, :] = 7
    return image, label


@pytest.mark.parametrize("crop", [(32, 48), (128, 160)])
def test_train_transform_size_and_nearest_masks(crop):
    image, label = sample_pair()
    transform = train_transform(crop_size=crop, seed=1)
    for _ in range(10):
        out_image, out_label = transform(image, label)
        assert out_image.shape == (*crop, 3) and out_image.dtype == np.uint8
        assert out_label.shape == crop and out_label.dtype == np.uint8
        assert set(np.unique(out_label)) <= {0, 4, 7, 255}


def test_train_transform_pads_with_ignore():
    image, label = sample_pair(20, 30)
    transform = train_transform(crop_size=(40, 50), scale_range=(1.0, 1.0), hflip=0.0, jitter=False, seed=0)
    out_image, out_label = transform(image, label)
    # Padding goes bottom/right: the original sits top-left, the rest is ignore / black.
    np.testing.assert_array_equal(out_label[:20, :30], label)
    np.testing.assert_array_equal(out_image[:20, :30], image)
    assert (out_label[20:] == 255).all() and (out_label[:, 30:] == 255).all()
    assert (out_image[20:] == 0).all() and (out_image[:, 30:] == 0).all()


def test_train_transform_is_seedable():
    image, label = sample_pair()

    def run(**kwargs):
        transform = train_transform(crop_size=(40, 40), **kwargs)
        return [transform(image, label) for _ in range(4)]

    def same(a, b):
        return all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))

    assert same(run(seed=5), run(seed=5))
    assert not same(run(seed=5), run(seed=6))
    np.random.seed(3)
    random.seed(3)
    first = run()
    np.random.seed(3)
    random.seed(3)
    assert same(first, run())
    transform = train_transform(crop_size=(40, 40), seed=0)
    transform.set_random_seed(9)
    assert same([transform(image, label) for _ in range(4)], run(seed=9))


def test_dataset_applies_transform(tmp_path):
    ds = FolderDataset(make_folder(tmp_path), transform=train_transform(crop_size=(16, 24), seed=0))
    image, label = ds[1]
    assert image.shape == (3, 16, 24) and image.dtype == torch.float32
    assert label.shape == (16, 24) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= {0, 1, 2, 255}
