"""Builders shared by the tests: tiny dataset trees in the real on-disk layouts, a seconds-long
training config, and weights that make a random model predict more than one class."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

# Cityscapes labelIds used in fixtures and the train ids they must map to (255 = ignored).
CITYSCAPES_ID_TO_TRAIN = {0: 255, 1: 255, 4: 255, 7: 0, 8: 1, 24: 11, 26: 13, 33: 18}


def write_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 100] if path.suffix.lower() in (".jpg", ".jpeg") else []
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), params), path
    return path


def write_mask(path: Path, mask: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mask), path
    return path


def rgb_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    # Distinct constant channels (R=10, G=120, B=230) plus a little noise: lets tests catch a
    # BGR/RGB swap even after lossy JPEG.
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = 10, 120, 230
    return np.clip(image + rng.integers(0, 3, image.shape), 0, 255).astype(np.uint8)


def mask_from_values(values, height: int, width: int) -> np.ndarray:
    # Tiles the given values row-major so that every one of them is present.
    flat = np.resize(np.asarray(values, np.uint8), height * width)
    return flat.reshape(height, width)


def make_cityscapes(
    root: Path, split: str = "val", cities=("aachen", "bochum"), per_city: int = 2, size=(8, 16)
) -> list[str]:
    """Writes leftImg8bit/gtFine pairs; returns the sample stems in sorted order."""
    stems = []
    ids = list(CITYSCAPES_ID_TO_TRAIN)
    for city in cities:
        for k in range(per_city):
            stem = f"{city}_{k:06d}_{19 + k:06d}"
            write_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", rgb_image(*size, k))
            label = mask_from_values(np.roll(ids, k), *size)
            write_mask(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", label)
            stems.append(stem)
    return sorted(stems)


def make_ade20k(
    root: Path, split_dir: str = "validation", count: int = 2, size=(8, 12), values=(0, 1, 2, 75, 150)
) -> Path:
    """Writes ADEChallengeData2016/{images,annotations}/<split_dir>; returns the dataset folder."""
    ade = root / "ADEChallengeData2016"
    for k in range(count):
        stem = f"ADE_{split_dir[:3]}_{k + 1:08d}"
        write_rgb(ade / "images" / split_dir / f"{stem}.jpg", rgb_image(*size, k))
        write_mask(ade / "annotations" / split_dir / f"{stem}.png", mask_from_values(values, *size))
    return ade


def make_folder(
    root: Path, split: str = "train", classes=("background", "road", "car"), size=(10, 14), palette=None
) -> Path:
    """Writes one .png and one .jpg image with annotations plus classes.txt (with a blank line)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes[:1]) + "\n\n" + "\n".join(classes[1:]) + "\n")
    if palette is not None:
        (root / "palette.txt").write_text("".join(f"{r} {g} {b}\n" for r, g, b in palette))
    values = list(range(len(classes))) + [255]
    for stem, suffix in (("a_png", ".png"), ("b_jpg", ".jpg")):
        write_rgb(root / "img_dir" / split / f"{stem}{suffix}", rgb_image(*size))
        write_mask(root / "ann_dir" / split / f"{stem}.png", mask_from_values(values, *size))
    return root


def write_garbage(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image \x00\x01\x02" * 8)
    return path


# The shipped CPU config shrunk to seconds: 64x128 images, 64x64 crops, an 8-wide decoder.
TINY_CPU_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "deeplabv3plus_tiny_synthetic_cpu.json"
SMALL_RUN = dict(
    synthetic_size=[64, 128],
    crop_size=[64, 64],
    synthetic_train_images=16,
    synthetic_val_images=4,
    batch_size=2,
    num_workers=0,
    decoder_channels=8,
    decision_hidden=8,
)


def write_small_config(path: Path, **changes) -> Path:
    """TINY_CPU_CONFIG with SMALL_RUN and `changes` on top, written to `path` (a config file)."""
    import json

    values = {**json.loads(TINY_CPU_CONFIG.read_text()), **SMALL_RUN, **changes}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values))
    return path


def he_init(model) -> None:
    """He-initialised convolutions and random biases, in place: a fresh model otherwise predicts
    one class everywhere (and gives every pixel to one expert), so a check would see only that."""
    import math

    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0, math.sqrt(2 / module.weight[0].numel()))
                if module.bias is not None:
                    module.bias.normal_(0, 0.5)
