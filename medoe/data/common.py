"""Shared pieces of the dataset contract: errors, file reading, validation, tensors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = 255

# (image_uint8 HxWx3 RGB, label_uint8 HxW) -> same; applied before tensor conversion.
PairTransform = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class DatasetError(ValueError):
    """Bad dataset input; the message is one line naming the offending file or root."""


def read_image(path: str | Path) -> np.ndarray:
    # IMREAD_COLOR also turns grayscale/RGBA files into 3 channels, so only garbage fails here.
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DatasetError(f"cannot read image file {path} (missing, unreadable or corrupt)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_label(path: str | Path) -> np.ndarray:
    # IMREAD_UNCHANGED so that a colour or 16-bit mask is reported instead of silently converted.
    label = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if label is None:
        raise DatasetError(f"cannot read label file {path} (missing, unreadable or corrupt)")
    if label.ndim != 2 or label.dtype != np.uint8:
        shape = "x".join(map(str, label.shape))
        raise DatasetError(f"label file {path} must be single-channel 8-bit, got shape {shape} dtype {label.dtype}")
    return label


def check_label_values(label: np.ndarray, num_classes: int, path: str | Path) -> None:
    # A bincount over 256 bins is faster than np.unique on large masks.
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = present[(present >= num_classes) & (present != IGNORE_INDEX)]
    if bad.size:
        raise DatasetError(
            f"label file {path} has value {int(bad[0])} >= num_classes={num_classes} "
            f"(only 0..{num_classes - 1} and {IGNORE_INDEX}=ignore are allowed)"
        )


def check_same_size(image: np.ndarray, label: np.ndarray, image_path, label_path) -> None:
    if image.shape[:2] != label.shape[:2]:
        (ih, iw), (lh, lw) = image.shape[:2], label.shape[:2]
        raise DatasetError(f"size mismatch: image {image_path} is {ih}x{iw} but label {label_path} is {lh}x{lw}")


def to_tensors(image: np.ndarray, label: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Values stay in 0..255: the model normalises internally.
    image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float()
    label_t = torch.from_numpy(np.ascontiguousarray(label)).long()
    return image_t, label_t


def default_palette(num_classes: int) -> list[tuple[int, int, int]]:
    # PASCAL VOC bit-interleaving colour map, shifted by one to skip black; deterministic and
    # distinct for up to 255 classes.
    palette = []
    for index in range(1, num_classes + 1):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette.append((r, g, b))
    return palette


class SegmentationDataset(Dataset):
    """Base: subclasses provide load() and label_map(); this supplies __getitem__."""

    ignore_index = IGNORE_INDEX
    class_names: list[str]
    palette: list[tuple[int, int, int]]

    def __init__(self, split: str, transform: PairTransform | None = None):
        self.split = split
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.load(index)
        if self.transform is not None:
            image, label = self.transform(image, label)
        return to_tensors(image, label)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def label_map(self, index: int) -> np.ndarray:
        raise NotImplementedError

    def sample_name(self, index: int) -> str:
        raise NotImplementedError


class FileSegDataset(SegmentationDataset):
    """A dataset backed by (image_path, label_path) pairs and a raw->train-id label mapping."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        names: Sequence[str],
        split: str,
        transform: PairTransform | None = None,
    ):
        super().__init__(split, transform)
        self.pairs = list(pairs)
        self.names = list(names)

    def __len__(self) -> int:
        return len(self.pairs)

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        return raw

    def label_map(self, index: int) -> np.ndarray:
        label_path = self.pairs[index][1]
        label = self.map_label(read_label(label_path))
        check_label_values(label, self.num_classes, label_path)
        return label

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        label = self.label_map(index)
        check_same_size(image, label, image_path, label_path)
        return image, label

    def sample_name(self, index: int) -> str:
        return self.names[index]


def check_not_empty(pairs: Sequence, root: Path, pattern: str) -> None:
    if not pairs:
        raise DatasetError(f"no samples found under {root} (searched {pattern})")
