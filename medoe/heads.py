"""Context modules: what turns backbone features into per-pixel decoder features.

Each takes the backbone's four stage outputs and returns one feature map with
`out_channels` channels; the expert's 1x1 classifier sits on top (see `model.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medoe.backbones import conv_bn_relu
from medoe.ops import resize


class ASPPHead(nn.Module):
    """DeepLabv3+: atrous spatial pyramid pooling on the last stage, then a stride-4 skip."""

    def __init__(self, in_channels: list[int], channels: int, output_stride: int = 8):
        super().__init__()
        rates = (12, 24, 36) if output_stride == 8 else (6, 12, 18)
        top, low = in_channels[-1], in_channels[0]
        self.branches = nn.ModuleList(
            [nn.Sequential(*conv_bn_relu(top, channels, 1))]
            + [nn.Sequential(*conv_bn_relu(top, channels, 3, dilation=r)) for r in rates]
        )
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(top, channels, 1))
        self.project = nn.Sequential(*conv_bn_relu(channels * (len(rates) + 2), channels, 1))
        low_channels = min(48, channels // 4)  # DeepLabv3+ squeezes the skip to 48 channels
        self.low_project = nn.Sequential(*conv_bn_relu(low, low_channels, 1))
        self.fuse = nn.Sequential(*conv_bn_relu(channels + low_channels, channels), *conv_bn_relu(channels, channels))
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        pooled = self.image_pool(x).expand(-1, -1, x.shape[2], x.shape[3])
        x = self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))
        low = self.low_project(features[0])
        return self.fuse(torch.cat([resize(x, low.shape[-2:]), low], dim=1))


class PPMHead(nn.Module):
    """PSPNet: pyramid pooling at 1, 2, 3 and 6 bins, concatenated with the input."""

    class BinAverage(nn.Module):
        """`nn.AdaptiveAvgPool2d(bins)` as two averaging matrices: rows @ x @ cols^T.

        ONNX exporters can only turn adaptive pooling into a fixed-kernel AvgPool, which
        needs (and bakes in) the input size. The bins here come from the input's size at run
        time with PyTorch's own integer rule (start = floor(i*n/b), end = ceil((i+1)*n/b)),
        so they are the same windows for every size, including sizes smaller than `bins`.
        """

        def __init__(self, bins: int):
            super().__init__()
            self.bins = bins

        def _averaging(self, size, like: Tensor) -> Tensor:
            index = torch.arange(self.bins, device=like.device)
            start = index * size // self.bins
            end = ((index + 1) * size + self.bins - 1) // self.bins
            position = torch.arange(size, device=like.device)
            members = (position >= start[:, None]) & (position < end[:, None])  # [bins, size]
            # Weights 1/count rather than a sum and a division: under fp16 autocast a sum
            # over a large feature map could overflow, a mean cannot.
            return members.to(like.dtype) / (end - start).to(like.dtype)[:, None]

        def forward(self, x: Tensor) -> Tensor:
            rows, cols = self._averaging(x.shape[-2], x), self._averaging(x.shape[-1], x)
            return rows @ x @ cols.transpose(0, 1)  # [N, C, bins, bins]

    def __init__(self, in_channels: list[int], channels: int, bins: tuple[int, ...] = (1, 2, 3, 6)):
        super().__init__()
        top = in_channels[-1]
        # Index 0 stays the pooling so checkpoint keys keep their names (stages.{i}.1.weight).
        self.stages = nn.ModuleList(nn.Sequential(PPMHead.BinAverage(b), *conv_bn_relu(top, channels, 1)) for b in bins)
        self.bottleneck = nn.Sequential(*conv_bn_relu(top + channels * len(bins), channels))
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        pyramid = [x] + [resize(stage(x), x.shape[-2:]) for stage in self.stages]
        return self.bottleneck(torch.cat(pyramid, dim=1))


class OCRHead(nn.Module):
    """OCRNet-style object-contextual representations.

    Soft object regions (one per class) are predicted from the features, each region's
    representation is the region-weighted mean of the pixel features, and every pixel
    attends over the region representations. The regions are learned end to end through
    the attention (no auxiliary region loss; see docs/method.md).
    """

    def __init__(self, in_channels: list[int], channels: int, num_classes: int):
        super().__init__()
        top = in_channels[-1]
        key_channels = max(channels // 2, 8)
        self.pixels = nn.Sequential(*conv_bn_relu(top, channels))
        self.regions = nn.Sequential(*conv_bn_relu(top, channels, 1), nn.Conv2d(channels, num_classes, 1))
        self.query = nn.Sequential(
            *conv_bn_relu(channels, key_channels, 1), *conv_bn_relu(key_channels, key_channels, 1)
        )
        self.key = nn.Sequential(*conv_bn_relu(channels, key_channels, 1), *conv_bn_relu(key_channels, key_channels, 1))
        self.value = nn.Sequential(*conv_bn_relu(channels, key_channels, 1))
        self.up = nn.Sequential(*conv_bn_relu(key_channels, channels, 1))
        self.fuse = nn.Sequential(*conv_bn_relu(channels * 2, channels, 1))
        self.scale = key_channels**-0.5
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        feats = self.pixels(x)
        n, c, h, w = feats.shape
        regions = torch.softmax(self.regions(x).flatten(2), dim=2)  # [N, R, HW]
        objects = torch.bmm(regions, feats.flatten(2).transpose(1, 2))  # [N, R, C]
        objects = objects.transpose(1, 2).unsqueeze(-1)  # [N, C, R, 1] so 1x1 convs apply
        query = self.query(feats).flatten(2).transpose(1, 2)  # [N, HW, Ck]
        key = self.key(objects).flatten(2)  # [N, Ck, R]
        value = self.value(objects).flatten(2).transpose(1, 2)  # [N, R, Ck]
        attention = torch.softmax(torch.bmm(query, key) * self.scale, dim=-1)  # [N, HW, R]
        context = torch.bmm(attention, value).transpose(1, 2).reshape(n, -1, h, w)
        return self.fuse(torch.cat([self.up(context), feats], dim=1))


class LightHead(nn.Module):
    """Two 3x3 convolutions on the last stage: the paper's "small number of convolutions"
    for experts 2..K, which see few pixels and would overfit a full context module."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.convs = nn.Sequential(*conv_bn_relu(in_channels[-1], channels), *conv_bn_relu(channels, channels))
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        return self.convs(features[-1])


class MLPHead(nn.Module):
    """SegFormer's all-MLP decoder: each stage linearly projected to `channels`, all upsampled to
    the first stage's (stride-4) size, concatenated and fused by a 1x1 conv + BN + ReLU."""

    def __init__(self, in_channels: list[int], channels: int):
        super().__init__()
        self.linears = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(*conv_bn_relu(channels * len(in_channels), channels, 1))
        self.out_channels = channels

    def forward(self, features: list[Tensor]) -> Tensor:
        size = features[0].shape[-2:]
        return self.fuse(
            torch.cat([resize(linear(f), size) for linear, f in zip(self.linears, features, strict=True)], dim=1)
        )


def build_context(name: str, in_channels: list[int], channels: int, num_classes: int, output_stride: int) -> nn.Module:
    if name == "aspp":
        return ASPPHead(in_channels, channels, output_stride)
    if name == "ppm":
        return PPMHead(in_channels, channels)
    if name == "ocr":
        return OCRHead(in_channels, channels, num_classes)
    if name == "light":
        return LightHead(in_channels, channels)
    if name == "mlp":
        return MLPHead(in_channels, channels)
    raise ValueError(f"unknown context module {name!r}, expected aspp, ppm, ocr, mlp or light")
