"""Confusion-matrix segmentation metrics (aAcc, mIoU, mAcc, per group) that can be merged across workers."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


def _nanmean(values: np.ndarray) -> float:
    # np.nanmean warns on all-NaN input; an all-absent selection is a legitimate NaN here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        return float(np.nanmean(values)) if values.size else math.nan


def _percent_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value) * 100.0


@dataclass
class SegMetrics:
    aAcc: float
    mIoU: float
    mAcc: float
    iou: np.ndarray
    acc: np.ndarray
    pixels: np.ndarray

    def group_means(self, groups: dict[str, list[int]]) -> dict[str, dict[str, float]]:
        num_classes = len(self.iou)
        out = {}
        for name, members in groups.items():
            idx = np.asarray(list(members), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
                raise ValueError(
                    f"group {name!r} has class ids outside [0, {num_classes}); use the groups of this dataset"
                )
            out[name] = {"mIoU": _nanmean(self.iou[idx]), "mAcc": _nanmean(self.acc[idx])}
        return out

    def to_dict(self, class_names: Sequence[str], groups: dict[str, list[int]] | None = None) -> dict:
        if len(class_names) != len(self.iou):
            raise ValueError(f"got {len(class_names)} class names for {len(self.iou)} classes; pass one name per class")
        group_values = self.group_means(groups) if groups else {}
        return {
            "aAcc": _percent_or_none(self.aAcc),
            "mIoU": _percent_or_none(self.mIoU),
            "mAcc": _percent_or_none(self.mAcc),
            "groups": {
                name: {key: _percent_or_none(v) for key, v in values.items()} for name, values in group_values.items()
            },
            "per_class": [
                {
                    "name": str(name),
                    "IoU": _percent_or_none(float(self.iou[c])),
                    "Acc": _percent_or_none(float(self.acc[c])),
                    "pixels": int(self.pixels[c]),
                }
                for c, name in enumerate(class_names)
            ],
        }


def _as_tensor(x, name: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integer class ids, got dtype {t.dtype}; take argmax over the class axis first"
        )
    return t


class ConfusionMatrix:
    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu") -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.mat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def update(self, pred, target) -> None:
        pred_t = _as_tensor(pred, "pred")
        target_t = _as_tensor(target, "target")
        if pred_t.shape != target_t.shape:
            raise ValueError(
                f"pred {tuple(pred_t.shape)} and target {tuple(target_t.shape)} differ in shape; "
                "resize predictions to the label size first"
            )
        pred_t = pred_t.to(self.mat.device, torch.int64).reshape(-1)
        target_t = target_t.to(self.mat.device, torch.int64).reshape(-1)
        valid = target_t != self.ignore_index
        target_t, pred_t = target_t[valid], pred_t[valid]
        if target_t.numel() == 0:
            return
        c = self.num_classes
        bad_target = target_t[(target_t < 0) | (target_t >= c)]
        if bad_target.numel():
            raise ValueError(
                f"target value {int(bad_target[0])} is outside [0, {c}) and is not ignore_index={self.ignore_index}; "
                "fix the label map"
            )
        bad_pred = pred_t[(pred_t < 0) | (pred_t >= c)]
        if bad_pred.numel():
            raise ValueError(f"prediction value {int(bad_pred[0])} is outside [0, {c}); predictions must be class ids")
        self.mat += torch.bincount(c * target_t + pred_t, minlength=c * c).reshape(c, c)

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        if other.num_classes != self.num_classes or other.ignore_index != self.ignore_index:
            raise ValueError(
                f"cannot merge a {other.num_classes}-class matrix (ignore {other.ignore_index}) into a "
                f"{self.num_classes}-class one (ignore {self.ignore_index}); build both with the same settings"
            )
        self.mat += other.mat.to(self.mat.device)
        return self

    def __iadd__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        return self.merge(other)

    def all_reduce(self) -> None:
        # Each process evaluates a shard; summing the matrices gives exactly the full-set metrics.
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.mat, op=dist.ReduceOp.SUM)

    def reset(self) -> None:
        self.mat.zero_()

    def compute(self) -> SegMetrics:
        mat = self.mat.cpu().to(torch.float64).numpy()
        tp = np.diag(mat)
        gt = mat.sum(axis=1)
        predicted = mat.sum(axis=0)
        present = gt > 0
        # Classes without ground truth are NaN (not 0) so a subset evaluation is not penalised
        # for classes it cannot contain; false positives on them still lower other classes' scores.
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(present, tp / (gt + predicted - tp), np.nan)
            acc = np.where(present, tp / gt, np.nan)
        total = gt.sum()
        return SegMetrics(
            aAcc=float(tp.sum() / total) if total > 0 else math.nan,
            mIoU=_nanmean(iou),
            mAcc=_nanmean(acc),
            iou=iou,
            acc=acc,
            pixels=gt.astype(np.int64),
        )
