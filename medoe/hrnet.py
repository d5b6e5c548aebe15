"""HRNetV2 backbones hrnet_w18_small, hrnet_w18 and hrnet_w48 (OCRNet's), and their weights from a local file.

A stem of two stride-2 3x3 convs, `layer1` (Bottlenecks at width 64), then stages 2..4 of
high-resolution modules: parallel BasicBlock branches at strides 4, 8, 16 and 32 (one branch more
per stage, opened by a `transition`), whose outputs every module fuses into every branch (strided
3x3 convs down, 1x1 conv + bilinear upsampling up). Returns five maps: the four branches and,
last, HRNetV2's representation, all branches resized to stride 4 and concatenated (15 x width
channels), which is what OCRNet's head reads. HRNet is never dilated: `output_stride` does not apply.

Module names are those of the official HRNet-Image-Classification `cls_hrnet.py` (conv1, bn1,
layer1, transition1, stage2.0.branches.0.0.conv1, stage2.0.fuse_layers.0.1.0, ...), which
mmsegmentation's `backbones/hrnet.py` keeps too, so both load by key. Every resize reads its size
from the tensors, so a traced graph keeps N, H and W dynamic and odd sizes line up.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from medoe.backbones import BasicBlock, Bottleneck, LoadReport, conv_bn_relu, copy_matching, read_state_dict
from medoe.ops import resize

STEM = 64
# name -> (branch width, layer1 blocks, (modules, blocks per branch) of stages 2..4), as the
# official experiments/cls_hrnet_w*.yaml and mmseg's configs (hr18s: ocrnet_hr18s_*) set them.
HRNET_ARCHS: dict[str, tuple[int, int, tuple[tuple[int, int], ...]]] = {
    "hrnet_w18_small": (18, 2, ((1, 2), (3, 2), (2, 2))),  # HRNetV2-W18-Small-v2
    "hrnet_w18": (18, 4, ((1, 4), (4, 4), (3, 4))),
    "hrnet_w48": (48, 4, ((1, 4), (4, 4), (3, 4))),
}


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1) -> list[nn.Module]:
    return conv_bn_relu(cin, cout, kernel, stride)[:2]  # the same conv and BN, no ReLU: a sum follows


class HighResolutionModule(nn.Module):
    """BasicBlock branches, then every output branch i sums all branches j brought to i's size."""

    def __init__(self, widths: list[int], blocks: int):
        super().__init__()
        self.branches = nn.ModuleList(nn.Sequential(*(BasicBlock(w, w) for _ in range(blocks))) for w in widths)
        self.fuse_layers = nn.ModuleList()
        for i, wi in enumerate(widths):
            row = nn.ModuleList()
            for j, wj in enumerate(widths):
                if j > i:  # coarser: 1x1 conv to i's width, upsampled in forward (no parameters)
                    row.append(nn.Sequential(*_conv_bn(wj, wi, 1)))
                elif j == i:  # Identity where the official code has None: same indices, no keys
                    row.append(nn.Identity())
                else:  # finer: i - j strided 3x3 convs, only the last one changes the width
                    steps = [nn.Sequential(*conv_bn_relu(wj, wj, 3, 2)) for _ in range(i - j - 1)]
                    row.append(nn.Sequential(*steps, nn.Sequential(*_conv_bn(wj, wi, 3, 2))))
            self.fuse_layers.append(row)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs, strict=True)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i]
            for j, layer in enumerate(row):
                if j > i:
                    y = y + resize(layer(xs[j]), xs[i].shape[-2:])
                elif j < i:
                    y = y + layer(xs[j])
            out.append(torch.relu(y))
        return out


def _transition(before: list[int], after: list[int]) -> nn.ModuleList:
    """Existing branches change width with a 3x3 conv (Identity if equal); the new one is a strided 3x3
    conv from the coarsest branch, nested one level deeper as in the official layout."""
    layers = nn.ModuleList()
    for i, width in enumerate(after):
        if i < len(before):
            same = before[i] == width
            layers.append(nn.Identity() if same else nn.Sequential(*conv_bn_relu(before[i], width, 3)))
        else:
            layers.append(nn.Sequential(nn.Sequential(*conv_bn_relu(before[-1], width, 3, 2))))
    return layers


class HRNet(nn.Module):
    """Returns [branch at stride 4, 8, 16, 32, their concatenation at stride 4] ([N, C_i, H/s, W/s])."""

    def __init__(self, name: str = "hrnet_w48"):
        super().__init__()
        if name not in HRNET_ARCHS:
            raise ValueError(f"unknown backbone {name!r}, expected one of {sorted(HRNET_ARCHS)}")
        width, layer1_blocks, stages = HRNET_ARCHS[name]
        self.name = name
        self.output_stride = 4  # of the concatenation the context modules read
        self.conv1 = nn.Conv2d(3, STEM, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(STEM)
        self.conv2 = nn.Conv2d(STEM, STEM, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(STEM)
        cout = STEM * Bottleneck.expansion
        downsample = nn.Sequential(*_conv_bn(STEM, cout, 1))
        self.layer1 = nn.Sequential(
            Bottleneck(STEM, STEM, downsample=downsample), *(Bottleneck(cout, STEM) for _ in range(layer1_blocks - 1))
        )
        widths = [cout]
        for index, (modules, blocks) in enumerate(stages, 2):
            after = [width * 2**b for b in range(index)]
            self.add_module(f"transition{index - 1}", _transition(widths, after))
            self.add_module(
                f"stage{index}", nn.Sequential(*(HighResolutionModule(after, blocks) for _ in range(modules)))
            )
            widths = after
        self.channels: list[int] = [*widths, sum(widths)]
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        # The official init_weights (and mmseg's Kaiming default); pretrained weights replace it.
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = torch.relu(self.bn1(self.conv1(x)))
        xs = [self.layer1(torch.relu(self.bn2(self.conv2(x))))]
        for index in (1, 2, 3):
            transition, stage = getattr(self, f"transition{index}"), getattr(self, f"stage{index + 1}")
            # A new branch starts from the coarsest existing one (official: y_list[-1]).
            xs = stage([layer(xs[min(i, len(xs) - 1)]) for i, layer in enumerate(transition)])
        size = xs[0].shape[-2:]
        return [*xs, torch.cat([xs[0], *(resize(x, size) for x in xs[1:])], dim=1)]


# --- weights ---------------------------------------------------------------------------------
# The official ImageNet files (HRNet-Image-Classification: hrnetv2_w*_imagenet_pretrained.pth) and
# mmseg's (backbone.* inside `state_dict`; its blocks register their BN as `bn1`/`bn2`/`bn3`
# through mmcv's build_norm_layer, so the names are the official ones) need no renaming beyond
# the wrappers read_state_dict strips. HRNet-Semantic-Segmentation saves its FullModel, whose
# network sits under `model.`. The classification head has no place here.
_CLASSIFIER = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def load_hrnet_weights(backbone: HRNet, path: str | Path) -> LoadReport:
    """Copy an official (HRNet-Image-Classification / HRNet-Semantic-Segmentation) or
    mmsegmentation-layout HRNet state dict into `backbone`.

    The ImageNet classifier head (`incre_modules`, `downsamp_modules`, `final_layer`, `classifier`)
    and any decode head are reported unused; a key whose shape differs from ours is unused with
    both shapes (a W18 file into W48, say), and ours stays missing.
    """
    ours = backbone.state_dict()
    candidates, unused = [], []
    for key, value in read_state_dict(path).items():
        target = key if key in ours else key.removeprefix("model.")
        if target.startswith(_CLASSIFIER):
            unused.append(f"{key} (ImageNet classification head, not part of the backbone)")
        else:
            candidates.append((target, value, [key]))
    return copy_matching(ours, candidates, unused)
