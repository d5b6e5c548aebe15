"""Tensor operations the model, training and export share."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def resize(x: Tensor, size, mode: str = "bilinear") -> Tensor:
    """[N, C, h, w] -> [N, C, *size], align_corners=False (mmsegmentation's and the exporters' convention)."""
    # The shortcut would be baked into an exported graph traced at one size: skip it then.
    if not torch.jit.is_tracing() and tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode=mode, align_corners=False)
