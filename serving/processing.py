"""Drawing and resizing for the `segment` python model; importable without Triton.

Decoding lives in serving/decode.py. Every refusal is a `ValueError` whose message names the
problem in one line, because the python backend sends that message to the client as an
INVALID_ARG error.
"""

from __future__ import annotations

import cv2
import numpy as np

from medoe.cli import parse_dims


def palette_array(palette, num_entries: int = 256) -> np.ndarray:
    """[C, 3] palette padded with black to 256 rows, so any uint8 label indexes it safely."""
    colours = np.asarray(palette, dtype=np.int64).reshape(-1, 3)
    if colours.size and (colours.min() < 0 or colours.max() > 255):
        raise ValueError("palette colours must be within 0..255")
    table = np.zeros((max(num_entries, len(colours)), 3), np.uint8)
    table[: len(colours)] = colours
    return table


def colorize(labels: np.ndarray, palette) -> np.ndarray:
    """[H, W] labels -> [H, W, 3] uint8 colours; labels without a palette entry are black."""
    table = (
        palette
        if isinstance(palette, np.ndarray) and palette.dtype == np.uint8 and len(palette) >= 256
        else palette_array(palette)
    )
    labels = np.asarray(labels)
    if labels.dtype == np.uint8 and labels.ndim == 2 and len(table) == 256:
        # A 3-channel lookup table: ~7x faster than fancy indexing at 512x1024, same result.
        return cv2.LUT(cv2.merge([labels, labels, labels]), np.ascontiguousarray(table[:256]).reshape(256, 1, 3))
    return table[labels.astype(np.intp)]


def overlay(image: np.ndarray, labels: np.ndarray, palette, alpha: float = 0.5) -> np.ndarray:
    """The colour mask blended over the image: (1 - alpha) * image + alpha * colour, rounded."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha} must be within 0..1")
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    # OpenCV's saturating uint8 blend: 2x faster than the float formula at 512x1024 and equal
    # to it at alpha 0.5 (elsewhere at most 1 apart where a value falls on .5).
    return cv2.addWeighted(np.ascontiguousarray(image), 1.0 - alpha, colorize(labels, palette), alpha, 0.0)


def class_share(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[C] float32 fraction of all pixels per class; pixels labelled >= C count only in the total."""
    labels = np.asarray(labels)
    if labels.dtype == np.uint8 and labels.size:  # OpenCV's histogram: ~8x faster than bincount
        counts = cv2.calcHist([np.ascontiguousarray(labels)], [0], None, [256], [0, 256]).ravel()[:num_classes]
    else:
        counts = np.bincount(labels.ravel().astype(np.intp), minlength=num_classes)[:num_classes]
    return (counts / max(labels.size, 1)).astype(np.float32)


def resize_labels_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] labels -> [H, W] by nearest neighbour; size is (H, W).

    INTER_NEAREST_EXACT samples pixel centres (what PIL and torch 'nearest-exact' do);
    plain INTER_NEAREST is shifted by half a pixel.
    """
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"target size {size} must be positive")
    if labels.shape == (height, width):
        return labels.copy()
    return cv2.resize(labels, (width, height), interpolation=cv2.INTER_NEAREST_EXACT)


def resize_map(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[h, w] float map (confidence, one expert's weight) -> float32 [H, W] by bilinear resize."""
    height, width = size
    if height < 1 or width < 1:
        raise ValueError(f"target size {size} must be positive")
    values = np.ascontiguousarray(values, np.float32)
    if values.shape == (height, width):
        return values.copy()
    return cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)


def parse_working_size(text: str) -> tuple[int, int] | None:
    """`"HxW"` -> (H, W); `""` -> None (keep each image's own size)."""
    if not text.strip():
        return None
    return parse_dims(text, "HxW", "working_size", minimum=32)  # type: ignore[return-value]


def resize_to_working_size(image: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """One size for every request, so Triton can batch requests of different sizes."""
    if size is None or image.shape[:2] == tuple(size):
        return image
    shrinking = image.shape[0] * image.shape[1] > size[0] * size[1]
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
