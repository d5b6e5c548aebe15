"""serving.client's local side: the images it is given (files, bytes or decoded pixels), the
check of --out made before any request, and the PNGs it writes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np

from serving.client.errors import ClientError
from serving.decode import decode_image

if TYPE_CHECKING:
    from serving.client import Result

Item = tuple[str, "bytes | np.ndarray"]  # (name, encoded bytes or decoded RGB uint8 [H, W, 3])


def read_inputs(paths_or_bytes: Sequence) -> list[Item]:
    """(name, data) per item: a path is read, bytes and decoded RGB uint8 [H, W, 3] arrays are
    taken as they are (named image<index>), a (name, bytes or array) pair keeps its name. A missing
    or unreadable file, or an array that is no RGB image, is a bad input (code 2)."""
    items: list[Item] = []
    for index, item in enumerate(paths_or_bytes):
        name, data = (str(item[0]), item[1]) if isinstance(item, tuple) else (f"image{index}", item)
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8 or data.ndim != 3 or data.shape[2] != 3 or 0 in data.shape:
                raise ClientError(
                    f"{name}: a decoded image must be RGB uint8 [H, W, 3], got {data.dtype} {list(data.shape)}", 2
                )
            items.append((name, data))
        elif isinstance(data, bytes | bytearray | memoryview):
            items.append((name, bytes(data)))
        else:
            path = Path(data)
            try:
                items.append((path.stem, path.read_bytes()))
            except OSError as err:
                raise ClientError(f"cannot read {path}: {err.strerror or err}", 2) from None
    if not items:
        raise ClientError("no images given", 2)
    return items


def decode(name: str, data: bytes | np.ndarray) -> np.ndarray:
    """RGB uint8 [H, W, 3] by the server's own rules (serving.decode); an array is already decoded."""
    if isinstance(data, np.ndarray):
        return data
    try:
        return decode_image(data)
    except ValueError as err:
        raise ClientError(f"{name}: {err}", 2) from None


def check_out_dir(out: str | Path, names: Sequence[str], suffixes: Sequence[str]) -> Path:
    """--out as a directory the client can create or write <name>_<suffix>.png into (ClientError, code 2, otherwise)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClientError(f"--out {out} exists and is not a directory", 2)
    if out.is_dir():
        if not os.access(out, os.W_OK | os.X_OK):
            raise ClientError(f"--out {out} is not writable", 2)
    else:
        parent = next(p for p in [*out.absolute().parents] if p.exists())  # "/" always exists
        if not parent.is_dir():
            raise ClientError(f"cannot create --out {out}: {parent} is not a directory", 2)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ClientError(f"cannot create --out {out}: {parent} is not writable", 2)
    seen: dict[str, int] = {}
    for index, name in enumerate(names):
        if name in seen:  # a/x.png and b/x.png would both write x_labels.png, the second over the first
            raise ClientError(
                f"images {seen[name] + 1} and {index + 1} are both named {name!r}: "
                f"their results would overwrite each other in --out {out}",
                2,
            )
        seen[name] = index
        for suffix in suffixes:
            target = out / f"{name}_{suffix}.png"
            if target.exists() and not target.is_file():
                raise ClientError(f"cannot write {target}: it exists and is not a file", 2)
    return out


def write_results(results: list[Result], out: Path) -> list[Path]:
    """<name>_labels.png (class ids) and <name>_overlay.png per result, for the outputs it holds."""
    try:  # the CLI checked --out before any request; this is for library callers and races
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ClientError(f"cannot create {out}: {err.strerror or err}", 2) from None
    written = []
    for result in results:
        for suffix, image in (("labels", result.labels), ("overlay", result.overlay)):
            if image is None:  # not requested
                continue
            path = out / f"{result.name}_{suffix}.png"
            if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image):
                raise ClientError(f"cannot write {path}", 2)
            written.append(path)
    return written
