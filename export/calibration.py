"""INT8 calibration data for TensorRT: images from a directory as uint8 NHWC batches of the opt shape.

The reader runs anywhere (it needs only OpenCV); the TensorRT calibrator that feeds it to the
builder exists only where `tensorrt` imports.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from medoe.io import atomic_write_bytes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

try:
    import tensorrt as trt
except (ImportError, OSError):  # OSError: the wheel is there but libnvinfer is not
    trt = None


def cover_and_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale so the image covers height x width, then take the centre: no padding, no distortion."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    size = (max(width, round(w * scale)), max(height, round(h * scale)))  # cv2 wants (W, H)
    if size != (w, h):
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


class CalibrationImages:
    """Full batches of `batch_shape` = (N, H, W, 3) uint8 RGB; a last partial batch is dropped."""

    def __init__(self, directory: str | Path, batch_shape: tuple[int, int, int, int], limit: int | None = None):
        directory = Path(directory)
        if len(batch_shape) != 4 or batch_shape[3] != 3 or min(batch_shape) < 1:
            raise ValueError(f"calibration batch shape must be (N, H, W, 3), got {tuple(batch_shape)}")
        if not directory.is_dir():
            raise ValueError(f"calibration directory not found: {directory}")
        files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if limit is not None:
            files = files[:limit]
        if len(files) < batch_shape[0]:
            raise ValueError(
                f"{directory} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); "
                f"calibration needs at least one batch of {batch_shape[0]}"
            )
        self.directory, self.files, self.batch_shape = directory, files, tuple(batch_shape)

    def __len__(self) -> int:
        return len(self.files) // self.batch_shape[0]

    def load(self, path: Path) -> np.ndarray:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"cannot read calibration image {path}")
        _, height, width, _ = self.batch_shape
        return cover_and_crop(cv2.cvtColor(image, cv2.COLOR_BGR2RGB), height, width)

    def __iter__(self) -> Iterator[np.ndarray]:
        n = self.batch_shape[0]
        for start in range(0, len(self) * n, n):
            yield np.ascontiguousarray(np.stack([self.load(p) for p in self.files[start : start + n]]))


if trt is not None:

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        """Feeds CalibrationImages to the builder; the cache lets a rebuild skip calibration."""

        def __init__(self, images: CalibrationImages, cache_file: str | Path):
            super().__init__()
            self.images, self.cache_file = images, Path(cache_file)
            self.batches = iter(images)
            self.device_batch = None  # keeps the current batch's GPU memory alive for TensorRT
            self.error: Exception | None = None  # raised in C++ callbacks it would be lost: kept here

        def get_batch_size(self) -> int:
            return self.images.batch_shape[0]

        def get_batch(self, names: list[str]):
            import torch

            try:
                batch = next(self.batches)
            except StopIteration:
                return None
            except Exception as err:
                self.error = err
                return None
            self.device_batch = torch.from_numpy(batch).cuda()
            return [int(self.device_batch.data_ptr())]

        def read_calibration_cache(self):
            return self.cache_file.read_bytes() if self.cache_file.is_file() else None

        def write_calibration_cache(self, cache) -> None:
            atomic_write_bytes(self.cache_file, bytes(cache))
