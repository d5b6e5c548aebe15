"""What one raw `medoe` request may hold, and how requests are packed into onnxruntime calls.

serving/onnx_model.py checks every request here before onnxruntime sees it, so a bad tensor is
refused in the project's words (not onnxruntime's node names), and it packs the requests the
dynamic batcher hands over together into calls of at most `max_batch_pixels` (sum of N*H*W):
the activations of one call grow with its pixels (~0.1 GB per megapixel for the shipped model,
docs/benchmark_memory.md), so the budget bounds what one call can take from the machine.
Numpy only, no Triton import: unit-testable without a server.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Chosen from docs/benchmark_memory.md: one `segment` request costs ~120 MiB per megapixel over
# the idle server while it runs (all processes, PSS); at this size the whole server peaked at
# 2.1 GiB, which leaves a 24 GiB machine room for the pipeline's next images and more.
DEFAULT_MAX_PIXELS = 16_000_000  # 4000x4000, 4608x3456 (a 16 MP camera)
# One onnxruntime call at most as large as the largest image allowed: a batch costs no more than
# one image does; 8 images of 512x1024 (the dynamic batcher's usual largest batch) use a quarter.
DEFAULT_MAX_BATCH_PIXELS = 16_000_000


def pixel_parameter(parameters: dict, key: str, default: int) -> int:
    """A positive pixel count from a Triton model config's `parameters`, else `default`; ValueError if not positive."""
    text = parameters.get(key, {}).get("string_value", "") or str(default)
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"parameter {key} is {text!r}, expected a positive number of pixels")
    return value


def read_limits(parameters: dict) -> tuple[int, int]:
    """(max_pixels, max_batch_pixels) from a Triton model config's `parameters`; ValueError if unusable."""
    max_pixels = pixel_parameter(parameters, "max_pixels", DEFAULT_MAX_PIXELS)
    max_batch_pixels = pixel_parameter(parameters, "max_batch_pixels", DEFAULT_MAX_BATCH_PIXELS)
    if max_pixels > max_batch_pixels:  # an image max_pixels lets through would be refused as a batch of one
        raise ValueError(f"parameter max_pixels ({max_pixels}) is over max_batch_pixels ({max_batch_pixels})")
    return max_pixels, max_batch_pixels


def check_images(name: str, array: np.ndarray, max_pixels: int, max_batch_pixels: int) -> str | None:
    """None when `array` is a batch the model can run within the limits, else what is wrong (one line).

    Triton already refuses a wrong dtype, rank or channel count from the config; these checks
    repeat them so the model is safe under any config, and add what the config cannot say.
    """
    shape = list(array.shape)
    if array.dtype != np.uint8:
        return f"{name} is {array.dtype}, expected uint8 RGB values 0..255"
    if array.ndim != 4 or shape[3] != 3:
        return f"{name} has shape {shape}, expected [N, H, W, 3]: a batch of N RGB images"
    batch, height, width = shape[:3]
    if min(batch, height, width) < 1:
        # The graph runs any size from 1x1 up; an empty one fails deep inside onnxruntime.
        return f"{name} has shape {shape}: empty, expected at least one image of at least 1x1 pixels"
    if height * width > max_pixels:
        return f"{name} is {width}x{height}, over the limit of {max_pixels} pixels per image (max_pixels)"
    if batch * height * width > max_batch_pixels:
        return (
            f"{name} is {batch} images of {width}x{height} = {batch * height * width} pixels, over the limit of "
            f"{max_batch_pixels} pixels per batch (max_batch_pixels); send fewer images per request"
        )
    return None


def plan_calls(shapes: Sequence[tuple[int, ...]], max_batch_pixels: int) -> list[list[int]]:
    """Indices of requests grouped into onnxruntime calls, given each request's input shape [N, H, W, C].

    Requests join a call only with others of the same H, W, C (they are concatenated along N), and
    a call's pixels (sum of N*H*W) stay within the budget. Every request fits alone: check_images
    refused the larger ones. Requests keep their order within a call.
    """
    calls: list[list[int]] = []
    open_calls: dict[tuple[int, ...], tuple[list[int], int]] = {}  # trailing shape -> (call, its pixels)
    for index, shape in enumerate(shapes):
        key, pixels = tuple(shape[1:]), int(np.prod(shape[:3]))
        call, used = open_calls.get(key, (None, 0))
        if call is None or used + pixels > max_batch_pixels:
            call, used = [], 0
            calls.append(call)
        call.append(index)
        open_calls[key] = (call, used + pixels)
    return calls
