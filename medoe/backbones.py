"""ResNet-c backbones (deep stem, dilated) and ImageNet weights from a local file.

ResNet-c replaces the 7x7 stem convolution by three 3x3 ones (mmsegmentation's ResNetV1c,
timm's `resnet50c`). Later stages trade stride for dilation so the last feature map stays at
1/8 or 1/16 of the input, as segmentation decoders expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, dilation: int = 1) -> list[nn.Module]:
    padding = dilation * (kernel // 2)
    return [
        nn.Conv2d(cin, cout, kernel, stride, padding, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, dilation: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # Stride on the 3x3 conv (ResNet v1.5 / v1c), as torchvision, timm and mmseg do.
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


# name -> (block, blocks per stage, stage widths, stem width)
ARCHS: dict[str, tuple[type[nn.Module], tuple[int, ...], tuple[int, ...], int]] = {
    "tiny": (BasicBlock, (1, 1, 1, 1), (16, 32, 64, 128), 16),  # trains on 2 CPU cores in minutes
    "resnet18c": (BasicBlock, (2, 2, 2, 2), (64, 128, 256, 512), 64),
    "resnet50c": (Bottleneck, (3, 4, 6, 3), (64, 128, 256, 512), 64),
    "resnet101c": (Bottleneck, (3, 4, 23, 3), (64, 128, 256, 512), 64),
}


class ResNetC(nn.Module):
    """Returns the four stage outputs (strides 4, 8, and 8 or 16 for the dilated ones)."""

    def __init__(self, name: str = "resnet50c", output_stride: int = 8):
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"unknown backbone {name!r}, expected one of {sorted(ARCHS)}")
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride={output_stride}, expected 8 or 16")
        block, depths, widths, stem = ARCHS[name]
        self.name = name
        self.output_stride = output_stride
        # Deep stem; module indices match mmseg's ResNetV1c (stem.0 conv, stem.1 bn, ...).
        self.stem = nn.Sequential(
            *conv_bn_relu(3, stem // 2, stride=2),
            *conv_bn_relu(stem // 2, stem // 2),
            *conv_bn_relu(stem // 2, stem),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        # Stage strides/dilations: output stride 8 dilates stages 3 and 4, 16 only stage 4.
        strides, dilations = ((1, 2, 1, 1), (1, 1, 2, 4)) if output_stride == 8 else ((1, 2, 2, 1), (1, 1, 1, 2))
        self.channels: list[int] = []
        cin = stem
        for index, (depth, width, stride, dilation) in enumerate(
            zip(depths, widths, strides, dilations, strict=True), 1
        ):
            layer, cin = self._make_layer(block, cin, width, depth, stride, dilation)
            self.add_module(f"layer{index}", layer)
            self.channels.append(cin)

    @staticmethod
    def _make_layer(block, cin: int, width: int, depth: int, stride: int, dilation: int) -> tuple[nn.Sequential, int]:
        cout = width * block.expansion
        downsample = None
        if stride != 1 or cin != cout:
            downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        # The first block keeps half the dilation (torchvision's replace_stride_with_dilation).
        first_dilation = max(1, dilation // 2)
        blocks = [block(cin, width, stride, first_dilation, downsample)]
        blocks += [block(cout, width, 1, dilation) for _ in range(depth - 1)]
        return nn.Sequential(*blocks), cout

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.maxpool(self.stem(x))
        features = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            features.append(x)
        return features


class LoadReport(NamedTuple):
    loaded: list[str]  # our parameter/buffer names that received a tensor
    missing: list[str]  # ours that the file did not provide (left at their initialisation)
    unused: list[str]  # the file's keys that had no place in ours (with the reason)


def _source_to_ours(key: str, deep_stem: bool) -> str | None:
    # timm `resnet*c`/`resnet*d` deep stem: conv1.{0,1,3,4,6} + bn1; mmseg: stem.* (identity).
    # torchvision's conv1/bn1 belong to a 7x7 stem that has no counterpart here: None.
    if key.startswith("conv1."):
        return "stem." + key[len("conv1.") :] if deep_stem else None
    if key.startswith("bn1."):
        return "stem.7." + key[len("bn1.") :] if deep_stem else None
    return key


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found: {path} (weights are never downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        # weights_only: a checkpoint file must never run code when it is read.
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


def load_imagenet_weights(backbone: ResNetC, path: str | Path) -> LoadReport:
    """Copy a torchvision-, timm- or mmseg-layout ResNet state dict into `backbone`.

    torchvision's 7x7 stem has no counterpart in the deep stem: it is reported as unused and
    the stem keeps its initialisation. The classifier (`fc.*`) is always unused.
    """
    source = read_state_dict(path)
    deep_stem = any(k.startswith("conv1.0.") for k in source)
    candidates, unused = [], []
    for key, value in source.items():
        target = _source_to_ours(key, deep_stem)
        if target is None:
            unused.append(f"{key} (7x7 stem, no counterpart in the deep stem)")
        else:
            candidates.append((target, value, [key]))
    return copy_matching(backbone.state_dict(), candidates, unused)


def copy_matching(ours: dict[str, Tensor], candidates, unused: list[str]) -> LoadReport:
    """Copies each candidate (our key, a tensor, the file's keys it was made from) into `ours`
    where the key exists and the shape matches; the others join `unused` with the reason."""
    loaded = []
    with torch.no_grad():
        for target, value, keys in candidates:
            if target not in ours:
                unused += [f"{key} (no such key)" for key in keys]
            elif ours[target].shape != value.shape:
                unused += [f"{key} (shape {tuple(value.shape)} != {tuple(ours[target].shape)})" for key in keys]
            else:
                ours[target].copy_(value)
                loaded.append(target)
    missing = sorted(set(ours) - set(loaded))
    return LoadReport(sorted(loaded), missing, sorted(set(unused)))


def build_backbone(name: str, output_stride: int = 8) -> nn.Module:
    """ResNetC for the ResNet names, the Mix Transformer (medoe.mit) for mit_b0..mit_b5, HRNetV2
    (medoe.hrnet) for hrnet_w18_small, hrnet_w18 and hrnet_w48.

    All return a list of stage maps and expose `channels`; MiT's strides are fixed (4, 8, 16, 32),
    HRNet's too (its four branches at 4, 8, 16, 32, then their stride-4 concatenation), so
    `output_stride` only applies to ResNetC."""
    if name.startswith("mit_"):
        from medoe.mit import MixTransformer  # medoe.mit imports this module

        return MixTransformer(name)
    if name.startswith("hrnet_"):
        from medoe.hrnet import HRNet  # medoe.hrnet imports this module

        return HRNet(name)
    return ResNetC(name, output_stride)


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> LoadReport:
    """`load_imagenet_weights` for ResNetC, `medoe.mit.load_mit_weights` for a Mix Transformer,
    `medoe.hrnet.load_hrnet_weights` for HRNet."""
    from medoe.hrnet import HRNet, load_hrnet_weights
    from medoe.mit import MixTransformer, load_mit_weights

    if isinstance(backbone, MixTransformer):
        return load_mit_weights(backbone, path)
    if isinstance(backbone, HRNet):
        return load_hrnet_weights(backbone, path)
    return load_imagenet_weights(backbone, path)
