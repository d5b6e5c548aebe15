"""Cityscapes fine annotations in the official layout, labelIds mapped to the 19 train ids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS

from medoe.data.common import (
    IGNORE_INDEX,
    DatasetError,
    FileSegDataset,
    PairTransform,
    check_not_empty,
)

_TRAIN_LABELS = sorted(
    (lab for lab in CITYSCAPES_LABELS if lab.trainId not in (IGNORE_INDEX, -1)),
    key=lambda lab: lab.trainId,
)
CLASS_NAMES = [lab.name for lab in _TRAIN_LABELS]
PALETTE = [tuple(lab.color) for lab in _TRAIN_LABELS]


def _build_lut() -> np.ndarray:
    # Ids absent from the table (34..254) also map to ignore, like the official scripts do.
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for lab in CITYSCAPES_LABELS:
        if 0 <= lab.id < 256 and lab.trainId not in (IGNORE_INDEX, -1):
            lut[lab.id] = lab.trainId
    return lut


LABEL_ID_TO_TRAIN_ID = _build_lut()
_IMAGE_SUFFIX = "_leftImg8bit.png"
_LABEL_SUFFIX = "_gtFine_labelIds.png"


class CityscapesDataset(FileSegDataset):
    class_names = CLASS_NAMES
    palette = PALETTE

    def __init__(self, root: str | Path, split: str = "train", transform: PairTransform | None = None):
        self.root = Path(root)
        image_dir = self.root / "leftImg8bit" / split
        label_dir = self.root / "gtFine" / split
        pattern = f"leftImg8bit/{split}/*/*{_IMAGE_SUFFIX}"
        pairs, names = [], []
        for image_path in sorted(image_dir.glob(f"*/*{_IMAGE_SUFFIX}")):
            stem = image_path.name[: -len(_IMAGE_SUFFIX)]
            label_path = label_dir / image_path.parent.name / f"{stem}{_LABEL_SUFFIX}"
            if not label_path.is_file():
                raise DatasetError(f"no annotation for image {image_path} (expected {label_path})")
            pairs.append((image_path, label_path))
            names.append(stem)
        check_not_empty(pairs, self.root, pattern)
        super().__init__(pairs, names, split, transform)

    def map_label(self, raw: np.ndarray) -> np.ndarray:
        return LABEL_ID_TO_TRAIN_ID[raw]
