"""Class frequency statistics and the head/body/tail split that defines the MEDOE experts."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from medoe.io import atomic_write_text

DEFAULT_THRESHOLDS = (0.80, 0.95)
GROUP_NAMES = ("head", "body", "tail")


class GroupSplitError(ValueError):
    pass


def default_thresholds(num_experts: int) -> tuple[float, ...]:
    # 0.80 and 0.95 stay fixed for K >= 3 so that "head" (the first group) and "tail" (the last
    # group) keep the same meaning whatever K is; extra experts only subdivide the body, which
    # keeps results for different K comparable on the head and tail classes.
    if num_experts < 2:
        raise ValueError(f"num_experts must be >= 2 (got {num_experts}); MEDOE needs at least a head and a tail expert")
    if num_experts == 2:
        return (0.80,)
    # Rounding removes linspace noise such as 0.8749999999 so thresholds print and compare cleanly.
    return tuple(round(float(t), 10) for t in np.linspace(0.80, 0.95, num_experts - 1))


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in thresholds)
    if not values:
        raise GroupSplitError(
            "thresholds is empty; give K-1 increasing values in (0, 1) for K groups, e.g. (0.80, 0.95)"
        )
    if any(not 0.0 < t < 1.0 for t in values) or any(a >= b for a, b in pairwise(values)):
        raise GroupSplitError(f"thresholds must be strictly increasing and inside (0, 1), got {values}")
    return values


def _ranking(pixel_counts: np.ndarray) -> np.ndarray:
    # A stable sort on the negated counts ranks ties by lower class index first.
    return np.argsort(-pixel_counts, kind="stable")


def split_groups(pixel_counts: Sequence[int] | np.ndarray, thresholds: Sequence[float]) -> list[list[int]]:
    values = _check_thresholds(thresholds)
    counts = np.asarray(pixel_counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0:
        raise GroupSplitError(f"pixel_counts must be a non-empty 1-D sequence, got shape {counts.shape}")
    if (counts < 0).any():
        raise GroupSplitError("pixel_counts must be non-negative")
    total = int(counts.sum())
    if total == 0:
        raise GroupSplitError("all pixel counts are zero; compute class statistics on labelled training images")

    order = _ranking(counts)
    # Share of all classes ranked before each class; integer cumsum then one division keeps an
    # exact hit such as 80/100 equal to the 0.80 threshold (that class counts as reaching it).
    before = np.concatenate(([0], np.cumsum(counts[order])[:-1])) / total
    group_of = np.searchsorted(np.asarray(values), before, side="right")
    groups: list[list[int]] = [[] for _ in range(len(values) + 1)]
    for cls, g in zip(order.tolist(), group_of.tolist(), strict=True):
        groups[g].append(cls)

    empty = [k + 1 for k, members in enumerate(groups) if not members]
    if empty:
        shares = ", ".join(f"{c}:{counts[c] / total:.4f}" for c in order.tolist())
        raise GroupSplitError(
            f"group(s) {empty} of {len(groups)} are empty with thresholds {values}; "
            f"class shares in rank order are [{shares}]; choose thresholds that separate these shares or use fewer "
            "experts"
        )
    return groups


def group_names(num_groups: int) -> list[str]:
    if num_groups == len(GROUP_NAMES):
        return list(GROUP_NAMES)
    return [f"group{k + 1}" for k in range(num_groups)]


@dataclass
class ClassStats:
    class_names: list[str]
    pixel_counts: list[int]
    image_counts: list[int]
    num_images: int

    def __post_init__(self) -> None:
        self.class_names = [str(n) for n in self.class_names]
        self.pixel_counts = [int(c) for c in self.pixel_counts]
        self.image_counts = [int(c) for c in self.image_counts]
        self.num_images = int(self.num_images)
        n = len(self.class_names)
        if len(self.pixel_counts) != n or len(self.image_counts) != n:
            raise ValueError(
                f"inconsistent lengths: {n} class_names, {len(self.pixel_counts)} pixel_counts, "
                f"{len(self.image_counts)} image_counts; all three must have one entry per class"
            )
        if min(self.pixel_counts + self.image_counts + [self.num_images], default=0) < 0:
            raise ValueError("pixel_counts, image_counts and num_images must be non-negative")
        if any(c > self.num_images for c in self.image_counts):
            raise ValueError(f"an image count exceeds num_images={self.num_images}; recompute the statistics")

    @classmethod
    def from_label_maps(
        cls, label_maps: Iterable[np.ndarray], class_names: Sequence[str], ignore_index: int = 255
    ) -> ClassStats:
        num_classes = len(class_names)
        pixels = np.zeros(num_classes, dtype=np.int64)
        images = np.zeros(num_classes, dtype=np.int64)
        num_images = 0
        for label in label_maps:
            flat = np.asarray(label).astype(np.int64, copy=False).ravel()
            flat = flat[flat != ignore_index]
            if flat.size:
                bad = flat[(flat < 0) | (flat >= num_classes)]
                if bad.size:
                    raise ValueError(
                        f"label value {int(bad[0])} is outside [0, {num_classes}) and is not "
                        f"ignore_index={ignore_index}; "
                        "map it to a class id or to the ignore index first"
                    )
            counts = np.bincount(flat, minlength=num_classes)
            pixels += counts
            images += counts > 0
            num_images += 1
        return cls(list(class_names), pixels.tolist(), images.tolist(), num_images)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def pixel_share(self) -> np.ndarray:
        counts = np.asarray(self.pixel_counts, dtype=np.float64)
        total = counts.sum()
        return counts / total if total > 0 else np.zeros_like(counts)

    def ranking(self) -> list[int]:
        return _ranking(np.asarray(self.pixel_counts, dtype=np.int64)).tolist()

    def groups(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[list[int]]:
        return split_groups(self.pixel_counts, thresholds)

    def group_dict(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[str, list[int]]:
        groups = self.groups(thresholds)
        return dict(zip(group_names(len(groups)), groups, strict=True))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ClassStats:
        if not isinstance(data, dict):
            raise ValueError(f"class statistics must be a JSON object, got {type(data).__name__}")
        missing = [k for k in ("class_names", "pixel_counts", "image_counts", "num_images") if k not in data]
        if missing:
            raise ValueError(f"class statistics lack keys {missing}; regenerate the statistics file")
        return cls(data["class_names"], data["pixel_counts"], data["image_counts"], data["num_images"])

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClassStats:
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(
                f"class statistics file {source} does not exist; compute it from the training labels first"
            )
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(
                f"class statistics file {source} is not valid JSON ({exc}); delete it and recompute"
            ) from exc
        try:
            return cls.from_dict(data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"class statistics file {source} is invalid: {exc}") from exc


def _check_groups(groups: Sequence[Sequence[int]], num_classes: int | None = None) -> None:
    seen: set[int] = set()
    for k, members in enumerate(groups):
        if not members:
            raise GroupSplitError(f"group {k + 1} is empty; every expert group needs at least one class")
        for c in members:
            if c < 0 or (num_classes is not None and c >= num_classes):
                raise ValueError(
                    f"class id {c} in group {k + 1} is outside [0, {num_classes}); groups must use valid class ids"
                )
            if c in seen:
                raise ValueError(f"class id {c} appears in more than one group; groups must be disjoint")
            seen.add(c)


def expert_sets(groups: Sequence[Sequence[int]], num_classes: int) -> torch.Tensor:
    _check_groups(groups, num_classes)
    sets = torch.zeros(len(groups), num_classes, dtype=torch.bool)
    # S_k is the union of groups k..K: fill from the last group backwards, inheriting S_{k+1}.
    for k in range(len(groups) - 1, -1, -1):
        if k + 1 < len(groups):
            sets[k] = sets[k + 1]
        sets[k, list(groups[k])] = True
    return sets


def expert_index_lut(groups: Sequence[Sequence[int]], ignore_index: int = 255) -> torch.Tensor:
    _check_groups(groups, 256)
    lut = torch.full((256,), ignore_index, dtype=torch.long)
    for k, members in enumerate(groups):
        for c in members:
            if c == ignore_index:
                raise ValueError(f"class id {c} equals ignore_index; class ids must differ from the ignore index")
            lut[c] = k
    return lut
