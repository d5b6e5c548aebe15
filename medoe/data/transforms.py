"""Training augmentation (albumentations 2): scale, pad, crop, flip, photometric jitter."""

from __future__ import annotations

import zlib

import albumentations as A
import cv2
import numpy as np
from torch.utils.data import get_worker_info

from medoe.data.common import IGNORE_INDEX


class AlbumentationsPair:
    """Adapts an A.Compose to the dataset contract `(image, label) -> (image, label)`.

    albumentations 2 keeps its own generators (seeded by Compose(seed=...)); with seed=None it
    would draw from OS entropy, so train_transform takes the seed from np.random instead, which
    makes `np.random.seed` effective. Forked DataLoader workers would all replay one stream, so
    unless set_random_seed() is used (e.g. per sample), each worker reseeds once from its
    torch-provided worker seed.
    """

    def __init__(self, compose: A.Compose, seed: int):
        self.compose = compose
        self.seed = seed
        self._explicit = False
        self._worker_id: int | None = None
        compose.set_random_seed(seed)

    def set_random_seed(self, seed: int) -> None:
        self.seed, self._explicit = seed, True
        self.compose.set_random_seed(seed)

    def __call__(self, image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        info = get_worker_info()
        if not self._explicit and info is not None and info.id != self._worker_id:
            self._worker_id = info.id
            self.compose.set_random_seed(zlib.crc32(f"{self.seed}/{info.seed}".encode()))
        out = self.compose(image=image, mask=label)
        return out["image"], out["mask"]


def train_transform(
    crop_size: tuple[int, int] = (512, 1024),
    scale_range: tuple[float, float] = (0.5, 2.0),
    ignore_index: int = IGNORE_INDEX,
    hflip: float = 0.5,
    jitter: bool = True,
    seed: int | None = None,
) -> AlbumentationsPair:
    crop_h, crop_w = crop_size
    low, high = scale_range
    if not 0 < low <= high:
        raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
    steps = [
        # RandomScale samples the factor from 1 + scale_limit.
        A.RandomScale(
            scale_limit=(low - 1.0, high - 1.0),
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            p=1.0,
        ),
        # Pad bottom/right so that the padded area is a plain ignore band, never mixed in.
        A.PadIfNeeded(
            min_height=crop_h,
            min_width=crop_w,
            position="top_left",
            border_mode=cv2.BORDER_CONSTANT,
            fill=0,
            fill_mask=ignore_index,
        ),
        A.RandomCrop(height=crop_h, width=crop_w),
        A.HorizontalFlip(p=hflip),
    ]
    if jitter:
        steps.append(A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.04, p=0.8))
    if seed is None:
        seed = int(np.random.randint(0, 2**31 - 1))
    compose = A.Compose(steps, mask_interpolation=cv2.INTER_NEAREST)
    return AlbumentationsPair(compose, seed)
