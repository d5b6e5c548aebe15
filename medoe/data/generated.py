"""What the generated domains (SyntheticStreets, SyntheticAerial) share: the dataset contract
over a `render(rng, height, width, with_image)` function, their pixel statistics and CLI."""

from __future__ import annotations

import argparse
import json
import sys
import zlib
from pathlib import Path

import numpy as np

from medoe.data.common import PairTransform, SegmentationDataset
from medoe.data.folder import export_folder_dataset

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


class GeneratedScenes(SegmentationDataset):
    """Images drawn on the fly from (seed, split, index): nothing is stored, any size works.

    Subclasses set `class_names`, `palette`, `prefix` (of sample names) and
    `render = staticmethod(render_scene)`, whose label must not depend on `with_image`.
    """

    prefix = "generated"

    def __init__(
        self,
        num_images: int = 200,
        height: int = 256,
        width: int = 512,
        seed: int = 0,
        split: str = "train",
        transform: PairTransform | None = None,
    ):
        super().__init__(split, transform)
        if num_images < 0 or height < 8 or width < 8:
            raise ValueError(
                f"{type(self).__name__} needs num_images >= 0 and size >= 8x8, got "
                f"{num_images} images of {height}x{width}"
            )
        self.num_images, self.height, self.width, self.seed = num_images, height, width, seed
        # Splits get disjoint random streams; unknown split names hash to their own stream.
        self._split_code = _SPLIT_CODES.get(split, zlib.crc32(split.encode()) + 3)

    def __len__(self) -> int:
        return self.num_images

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_images:
            raise IndexError(f"{type(self).__name__} index {index} out of range 0..{self.num_images - 1}")
        return np.random.default_rng([self.seed, self._split_code, index])

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.render(self._rng(index), self.height, self.width, with_image=True)

    def label_map(self, index: int) -> np.ndarray:
        return self.render(self._rng(index), self.height, self.width, with_image=False)[1]

    def sample_name(self, index: int) -> str:
        return f"{self.prefix}_{self.split}_{index:06d}"


def _groups(shares) -> dict[str, list[int]]:
    # Head until the cumulative share reaches 0.80 (the crossing class is head), body until 0.95.
    groups = {"head": [], "body": [], "tail": []}
    cumulative = 0.0
    for index in np.argsort(-np.asarray(shares), kind="stable"):
        name = "head" if cumulative < 0.80 else "body" if cumulative < 0.95 else "tail"
        groups[name].append(int(index))
        cumulative += shares[index]
    return groups


def pixel_stats(dataset: GeneratedScenes) -> dict:
    counts = np.zeros(256, np.int64)
    for i in range(len(dataset)):
        counts += np.bincount(dataset.label_map(i).ravel(), minlength=256)
    shares = counts[: dataset.num_classes] / max(1, counts[: dataset.num_classes].sum())
    groups = _groups(shares)
    return {
        "classes": list(dataset.class_names),
        "pixel_share": [round(float(s), 6) for s in shares],
        "groups": {k: [dataset.class_names[i] for i in v] for k, v in groups.items()},
    }


def generator_main(dataset_class: type[GeneratedScenes], prog: str, description: str, argv=None) -> int:
    """`python -m medoe.data.{synthetic,aerial}`: class shares and groups, or folder-layout PNGs."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--num", type=int, default=200, help="number of images")
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", default="train")
    parser.add_argument("--stats", action="store_true", help="print class pixel shares and groups")
    parser.add_argument("--json", action="store_true", help="with --stats: print one JSON object")
    parser.add_argument("--out", type=Path, help="write PNG pairs in the folder-dataset layout")
    args = parser.parse_args(argv)
    if not args.stats and args.out is None:
        parser.error("nothing to do: give --stats and/or --out DIR")
    dataset = dataset_class(args.num, args.height, args.width, args.seed, args.split)
    if args.out is not None:
        export_folder_dataset(dataset, args.out)
        print(f"wrote {len(dataset)} image/label pairs to {args.out}", file=sys.stderr)
    if args.stats:
        stats = pixel_stats(dataset)
        if args.json:
            print(json.dumps(stats))
        else:
            for name, share in zip(stats["classes"], stats["pixel_share"], strict=True):
                group = next(g for g, names in stats["groups"].items() if name in names)
                print(f"{name:>14s}  {100 * share:6.2f}%  {group}")
    return 0
