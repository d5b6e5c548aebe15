"""The exported graph (SPEC §9) as a module, and the metadata it carries (medoe.contract).

`ExportGraph` is what every exporter traces and what the benchmark runs eagerly. Parity
checks compare against the model's own forward (`run_model`), so a mistake in the wrapper
fails them as surely as one in the exporter.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from medoe.class_stats import DEFAULT_THRESHOLDS, ClassStats, GroupSplitError, group_names
from medoe.config import ModelConfig
from medoe.contract import (
    CONFIDENCE,
    DEFAULT_OUTPUTS,
    EXPERT_WEIGHTS,
    GRAPH_OUTPUTS,
    LABELS,
    PROBS,
    ModelMetadata,
)
from medoe.data.common import default_palette
from medoe.model import MEDOE, BaselineModel, Segmentation, SegmentationModel
from medoe.ops import resize


class ExportGraph(nn.Module):
    """uint8 `[N, H, W, 3]` RGB in; the requested outputs, in order, out."""

    def __init__(self, model: SegmentationModel, outputs: tuple[str, ...] | list[str]):
        super().__init__()
        self.model = model
        self.outputs = tuple(outputs)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        # The model normalises 0..255 floats itself; only layout and dtype change here.
        # contiguous(): eager PyTorch would otherwise run the network in channels-last strides.
        pixels = images.permute(0, 3, 1, 2).to(torch.float32).contiguous()
        if isinstance(self.model, BaselineModel) and PROBS not in self.outputs:
            values = self._baseline_without_probs(pixels)
        else:
            values = by_name(self.model(pixels))
        values[LABELS] = values[LABELS].to(torch.uint8)
        return tuple(values[name] for name in self.outputs)

    def _baseline_without_probs(self, pixels: Tensor) -> dict[str, Tensor]:
        # Same labels and confidence as BaselineModel.forward without its full-resolution
        # softmax: argmax softmax(z) = argmax z and max softmax(z) = 1 / sum exp(z - max z).
        # onnxruntime's channel-axis Softmax took 2/3 of the baseline's time at 512x1024.
        logits = resize(self.model.logits(pixels), pixels.shape[-2:])
        top, labels = logits.max(dim=1)
        return {LABELS: labels, CONFIDENCE: 1 / torch.exp(logits - top.unsqueeze(1)).sum(dim=1)}


def by_name(result: Segmentation) -> dict[str, Tensor]:
    """The model's forward result under the graph's output names."""
    return {
        LABELS: result.labels,
        CONFIDENCE: result.confidence,
        EXPERT_WEIGHTS: result.expert_weights,
        PROBS: result.probs,
    }


def choose_outputs(model: SegmentationModel, requested: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    is_medoe = isinstance(model, MEDOE)
    if requested is None:
        return tuple(n for n in DEFAULT_OUTPUTS if is_medoe or n != EXPERT_WEIGHTS)
    unknown = [n for n in requested if n not in GRAPH_OUTPUTS]
    if unknown:
        raise ValueError(f"unknown output(s) {unknown}, choose from {list(GRAPH_OUTPUTS)}")
    if EXPERT_WEIGHTS in requested and not is_medoe:
        raise ValueError(f"a {model.config.model!r} checkpoint has one decoder and no expert_weights output")
    if len(set(requested)) != len(requested):
        raise ValueError(f"output listed twice in {list(requested)}")
    return tuple(requested)


def build_graph(model: SegmentationModel, outputs=None) -> ExportGraph:
    if model.config.num_classes > 256:
        raise ValueError(f"labels are uint8: at most 256 classes, the model has {model.config.num_classes}")
    return ExportGraph(model, choose_outputs(model, outputs)).eval()


def class_groups(config: ModelConfig, stats: ClassStats | None, model: SegmentationModel) -> dict[str, list[int]]:
    """Head/body/tail class indices: from the training pixel counts at (0.80, 0.95)."""
    if stats is not None:
        try:
            return stats.group_dict(DEFAULT_THRESHOLDS)
        except GroupSplitError:
            pass  # too few classes for three groups: fall through to the experts' groups
    if isinstance(model, MEDOE):
        groups = model.groups()
        return dict(zip(group_names(len(groups)), groups, strict=True))
    return {}


def graph_metadata(model: SegmentationModel, stats: ClassStats | None, outputs: tuple[str, ...]) -> ModelMetadata:
    """What the exported graph says about itself (medoe.contract writes it into the graph)."""
    config = model.config
    names = (
        config.class_names or (stats.class_names if stats else []) or [f"class{i}" for i in range(config.num_classes)]
    )
    palette = config.palette or [list(c) for c in default_palette(config.num_classes)]
    is_medoe = isinstance(model, MEDOE)
    return ModelMetadata(
        model_type=config.model,
        backbone=config.backbone,
        context=config.context,
        num_classes=config.num_classes,
        class_names=list(names),
        palette=[[int(v) for v in c] for c in palette],
        groups=class_groups(config, stats, model),
        group_thresholds=list(DEFAULT_THRESHOLDS),
        num_experts=model.num_experts if is_medoe else 0,
        expert_groups=model.groups() if is_medoe else [],
        outputs=list(outputs),
    )


@torch.inference_mode()
def run_model(model: SegmentationModel, images: np.ndarray, outputs) -> dict[str, np.ndarray]:
    """The reference: the model's own forward, independent of ExportGraph's code."""
    result = model(torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float())
    values = by_name(result)
    values[LABELS] = values[LABELS].to(torch.uint8)
    return {name: values[name].numpy() for name in outputs}


@torch.inference_mode()
def run_torch(graph: ExportGraph, images: np.ndarray) -> dict[str, np.ndarray]:
    values = graph(torch.from_numpy(np.ascontiguousarray(images)))
    return {name: v.numpy() for name, v in zip(graph.outputs, values, strict=True)}


def random_images(batch: int, height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
