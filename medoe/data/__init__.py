"""Datasets (synthetic, Cityscapes, ADE20K, folder) sharing one contract; see common.py.

Dataset classes and transforms are imported lazily so that `python -m medoe.data.synthetic`
does not import its own module twice and `import medoe.data` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from medoe.config import GENERATED
from medoe.data.common import IGNORE_INDEX, DatasetError, SegmentationDataset

if TYPE_CHECKING:
    from medoe.data.ade20k import ADE20KDataset
    from medoe.data.aerial import SyntheticAerial
    from medoe.data.cityscapes import CityscapesDataset
    from medoe.data.folder import FolderDataset
    from medoe.data.synthetic import SyntheticStreets
    from medoe.data.transforms import train_transform

_LAZY = {
    "SyntheticStreets": "medoe.data.synthetic",
    "SyntheticAerial": "medoe.data.aerial",
    "CityscapesDataset": "medoe.data.cityscapes",
    "ADE20KDataset": "medoe.data.ade20k",
    "FolderDataset": "medoe.data.folder",
    "train_transform": "medoe.data.transforms",
}
DATASETS = {
    "synthetic": "SyntheticStreets",
    "aerial": "SyntheticAerial",
    "cityscapes": "CityscapesDataset",
    "ade20k": "ADE20KDataset",
    "folder": "FolderDataset",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medoe.data' has no attribute {name!r}")


def build_dataset(name: str, root=None, split: str = "train", transform=None, **kwargs):
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    cls = __getattr__(DATASETS[name])
    if name in GENERATED:
        # Generated on the fly: root is meaningless and ignored.
        return cls(split=split, transform=transform, **kwargs)
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a root directory (got root=None)")
    return cls(root, split=split, transform=transform, **kwargs)


__all__ = [
    "ADE20KDataset",
    "CityscapesDataset",
    "DATASETS",
    "DatasetError",
    "FolderDataset",
    "IGNORE_INDEX",
    "SegmentationDataset",
    "SyntheticAerial",
    "SyntheticStreets",
    "build_dataset",
    "train_transform",
]
