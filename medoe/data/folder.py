"""A generic folder dataset: ROOT/img_dir/{split}/*, ROOT/ann_dir/{split}/*.png, classes.txt."""

from __future__ import annotations

from pathlib import Path

import cv2

from medoe.data.common import (
    DatasetError,
    FileSegDataset,
    PairTransform,
    check_not_empty,
    default_palette,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_class_names(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"class list not found: {path} (one class name per line)")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = [name for name in names if name]
    if not names:
        raise DatasetError(f"class list {path} has no class names")
    if len(names) > 255:
        raise DatasetError(f"class list {path} has {len(names)} classes; at most 255 fit uint8 labels")
    return names


def read_palette(path: Path, num_classes: int) -> list[tuple[int, int, int]]:
    palette = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.replace(",", " ").split()
        try:
            rgb = tuple(int(p) for p in parts)
        except ValueError:
            rgb = ()
        if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
            raise DatasetError(f"palette file {path} line {line_no}: expected 'r g b' in 0..255")
        palette.append(rgb)
    if len(palette) != num_classes:
        raise DatasetError(f"palette file {path} has {len(palette)} colours but there are {num_classes} classes")
    return palette


def write_class_files(root: Path, class_names, palette=None) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in class_names), encoding="utf-8")
    if palette is not None:
        lines = "".join(f"{r} {g} {b}\n" for r, g, b in palette)
        (root / "palette.txt").write_text(lines, encoding="utf-8")


def export_folder_dataset(dataset, out: str | Path) -> None:
    """Write any dataset's (image, label) pairs as PNGs in the layout FolderDataset reads."""
    out = Path(out)
    image_dir, label_dir = out / "img_dir" / dataset.split, out / "ann_dir" / dataset.split
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    write_class_files(out, dataset.class_names, dataset.palette)
    for i in range(len(dataset)):
        image, label = dataset.load(i)
        name = dataset.sample_name(i)
        for path, array in (
            (image_dir / f"{name}.png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR)),
            (label_dir / f"{name}.png", label),
        ):
            if not cv2.imwrite(str(path), array):
                raise DatasetError(f"cannot write {path}")


class FolderDataset(FileSegDataset):
    def __init__(self, root: str | Path, split: str = "train", transform: PairTransform | None = None):
        self.root = Path(root)
        self.class_names = read_class_names(self.root / "classes.txt")
        palette_path = self.root / "palette.txt"
        self.palette = (
            read_palette(palette_path, len(self.class_names))
            if palette_path.is_file()
            else default_palette(len(self.class_names))
        )
        image_dir, label_dir = self.root / "img_dir" / split, self.root / "ann_dir" / split
        by_stem: dict[str, Path] = {}
        images = sorted(p for p in image_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for image_path in images:
            if image_path.stem in by_stem:
                raise DatasetError(
                    f"two images share the stem {image_path.stem!r}: {by_stem[image_path.stem]} and {image_path}"
                )
            by_stem[image_path.stem] = image_path
        pairs, names = [], []
        for stem, image_path in sorted(by_stem.items()):
            label_path = label_dir / f"{stem}.png"
            if not label_path.is_file():
                raise DatasetError(f"no annotation for image {image_path} (expected {label_path})")
            pairs.append((image_path, label_path))
            names.append(stem)
        check_not_empty(pairs, self.root, f"img_dir/{split}/*{{{','.join(IMAGE_SUFFIXES)}}}")
        super().__init__(pairs, names, split, transform)
