"""Sliding-window inference (mmsegmentation's `slide` mode) for images larger than the training crop.

Windows of the training crop size move with a stride of 2/3 of the crop; the last window in
each direction is shifted back so it ends at the border (no padding). The final probabilities
of overlapping windows are averaged and the argmax of the average is the prediction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from medoe.model import Segmentation
from medoe.ops import resize

# (window images [B, 3, h, w], window labels [B, h, w] or None) -> Segmentation of the window
WindowFn = Callable[[Tensor, Tensor | None], Segmentation]


def default_stride(crop_size: Sequence[int]) -> tuple[int, int]:
    # 2/3 of the crop, rounded: 512x1024 -> 341x683, the stride of mmseg's Cityscapes configs.
    return tuple(max(1, round(c * 2 / 3)) for c in crop_size)


def _starts(size: int, crop: int, stride: int) -> list[int]:
    # mmseg's grid count, with every start clamped so the window stays inside the image.
    count = max(size - crop + stride - 1, 0) // stride + 1
    starts = [max(min(i * stride + crop, size) - crop, 0) for i in range(count)]
    return sorted(set(starts))


def window_grid(
    height: int, width: int, crop_size: Sequence[int], stride: Sequence[int] | None = None
) -> list[tuple[int, int, int, int]]:
    """(y0, y1, x0, x1) of every window; one window when the image fits into the crop."""
    crop_h, crop_w = (int(c) for c in crop_size)
    if crop_h < 1 or crop_w < 1:
        raise ValueError(f"crop size must be positive, got {tuple(crop_size)}")
    stride_h, stride_w = (int(s) for s in (stride or default_stride(crop_size)))
    if stride_h < 1 or stride_w < 1:
        raise ValueError(f"slide stride must be positive, got {(stride_h, stride_w)}")
    win_h, win_w = min(crop_h, height), min(crop_w, width)
    return [
        (y, y + win_h, x, x + win_w) for y in _starts(height, win_h, stride_h) for x in _starts(width, win_w, stride_w)
    ]


def slide_inference(
    fn: WindowFn,
    images: Tensor,
    crop_size: Sequence[int],
    labels: Tensor | None = None,
    stride: Sequence[int] | None = None,
    max_windows: int = 8,
) -> Segmentation:
    """Runs `fn` on windows of `images` and averages their probabilities.

    `fn` is `lambda x, y: model(x)` for ordinary inference or `model.oracle` for MEDOE's oracle
    (labels are windowed alongside the images). Windows of all images are batched together,
    at most `max_windows` per forward call, which bounds memory on large images.
    """
    n, _, height, width = images.shape
    grid = window_grid(height, width, crop_size, stride)
    if len(grid) == 1:
        # The image fits into one crop: exactly whole-image inference.
        return fn(images, labels)
    probs_sum: Tensor | None = None
    weights_sum: Tensor | None = None
    count = images.new_zeros(1, 1, height, width)
    jobs = [(i, window) for window in grid for i in range(n)]
    for begin in range(0, len(jobs), max(1, max_windows)):
        chunk = jobs[begin : begin + max(1, max_windows)]
        crops = torch.stack([images[i, :, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in chunk])
        crop_labels = (
            None if labels is None else torch.stack([labels[i, y0:y1, x0:x1] for i, (y0, y1, x0, x1) in chunk])
        )
        out = fn(crops, crop_labels)
        if probs_sum is None:
            probs_sum = images.new_zeros(n, out.probs.shape[1], height, width, dtype=out.probs.dtype)
        if out.expert_weights is not None and weights_sum is None:
            weights_sum = images.new_zeros(
                n, out.expert_weights.shape[1], height, width, dtype=out.expert_weights.dtype
            )
        # Expert weights come at decoder resolution; bring them to window size to average them.
        window_weights = None if weights_sum is None else resize(out.expert_weights.float(), crops.shape[-2:])
        for j, (i, (y0, y1, x0, x1)) in enumerate(chunk):
            probs_sum[i, :, y0:y1, x0:x1] += out.probs[j]
            if window_weights is not None:
                weights_sum[i, :, y0:y1, x0:x1] += window_weights[j].to(weights_sum.dtype)
    for y0, y1, x0, x1 in grid:
        count[..., y0:y1, x0:x1] += 1
    probs = probs_sum / count
    confidence, predicted = probs.max(dim=1)
    # Slide mode returns the expert weights at input resolution (whole mode: decoder resolution).
    expert_weights = None if weights_sum is None else weights_sum / count
    return Segmentation(predicted, confidence, probs, expert_weights)
