"""What train, evaluate and the benchmark share: datasets, class statistics, batches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medoe.class_stats import ClassStats
from medoe.config import GENERATED, TrainConfig
from medoe.data import build_dataset, train_transform
from medoe.data.common import to_tensors


def get_dataset(config: TrainConfig, split: str) -> Dataset:
    """The un-augmented dataset; training wraps it in AugmentedSamples."""
    kwargs = {}
    if config.dataset in GENERATED:
        height, width = config.synthetic_size
        count = config.synthetic_train_images if split == "train" else config.synthetic_val_images
        kwargs = dict(num_images=count, height=height, width=width, seed=config.seed)
    elif not config.data_root:
        raise ValueError(f"dataset {config.dataset!r} needs --data-root")
    return build_dataset(config.dataset, config.data_root or None, split=split, **kwargs)


def compute_class_stats(dataset, work_dir: Path, ignore_index: int = 255) -> ClassStats:
    """One pass over the training labels, saved once and reused by later runs and stages."""
    path = work_dir / "class_stats.json"
    if path.is_file():
        return ClassStats.load(path)
    stats = ClassStats.from_label_maps(
        (dataset.label_map(i) for i in range(len(dataset))), dataset.class_names, ignore_index
    )
    stats.save(path)
    return stats


class Subset(torch.utils.data.Subset):
    """torch's Subset with the rest of the dataset contract (load, label_map, palette, ...)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, [int(i) for i in indices])

    def load(self, index: int):
        return self.dataset.load(self.indices[index])

    def label_map(self, index: int):
        return self.dataset.label_map(self.indices[index])

    def __getattr__(self, name):  # class_names, palette, ignore_index, sample_name, ...
        return getattr(self.dataset, name)


def split_holdout(dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """(images stage 1 fits, images only stage 2 sees): a seeded random `share` is held back.

    Stage 2 learns when to trust which expert; on images the experts fitted they are surer and
    more often right than on new ones, so a decision maker fitted there trusts them too much.
    """
    if share <= 0:
        return dataset, dataset
    order = np.random.default_rng([seed, 2]).permutation(len(dataset))
    held = max(1, round(share * len(dataset)))
    if held >= len(dataset):
        raise ValueError(f"stage2_holdout={share} leaves no image of {len(dataset)} for stage 1")
    return Subset(dataset, np.sort(order[held:])), Subset(dataset, np.sort(order[:held]))


class SeededBatches:
    """Batches of (index, sample_seed) for iterations start..iters, derived from (seed, iteration).

    Nothing about the data order depends on earlier iterations, so a resumed run sees the
    same batches as an uninterrupted one; each process takes its own slice of every batch.
    """

    def __init__(self, num_samples, batch_size, seed, iters, start=0, rank=0, world_size=1):
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.iters, self.start, self.rank, self.world_size = iters, start, rank, world_size

    def __len__(self) -> int:
        return self.iters - self.start

    def __iter__(self):
        for it in range(self.start, self.iters):
            rng = np.random.default_rng([self.seed, it])
            total = self.batch_size * self.world_size
            indices = rng.integers(0, self.num_samples, total)
            seeds = rng.integers(0, 2**31 - 1, total)
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            yield list(zip(indices[mine].tolist(), seeds[mine].tolist(), strict=True))


class AugmentedSamples(Dataset):
    """Applies the training transform with a per-sample seed, so augmentation is reproducible."""

    def __init__(self, dataset, crop_size):
        self.dataset = dataset
        self.transform = train_transform(tuple(crop_size), ignore_index=dataset.ignore_index)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        image, label = self.dataset.load(index)
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (2**32))
        return to_tensors(*self.transform(image, label))


def make_loader(dataset, batches: SeededBatches, workers: int, seed: int, crop_size) -> DataLoader:
    return DataLoader(
        AugmentedSamples(dataset, crop_size),
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        generator=torch.Generator().manual_seed(seed),  # keeps the global RNG untouched
    )


def write_json(path: Path, values) -> None:
    from medoe.io import atomic_write_text

    atomic_write_text(path, json.dumps(values, indent=2, allow_nan=False) + "\n")
