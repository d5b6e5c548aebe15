"""`--check`: the server's labels against in-process onnxruntime on a local copy of the graph."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medoe.contract import IMAGES, LABELS
from serving.client.errors import ClientError
from serving.client.files import Item, decode

if TYPE_CHECKING:
    from serving.client import Result

MIN_AGREEMENT = 0.9999  # fraction of pixels whose labels must be equal


def check_against_onnx(results: list[Result], items: list[Item], onnx_path: str | Path) -> float:
    """Fraction of pixels whose server label equals in-process onnxruntime's on `onnx_path`."""
    from serving.ort_memory import cpu_session  # onnxruntime: only for --check

    if not Path(onnx_path).is_file():
        raise ClientError(f"--check: no ONNX file at {onnx_path}", 2)
    session = cpu_session(onnx_path)
    same = total = 0
    for result, (name, data) in zip(results, items, strict=True):
        if result.labels is None:
            raise ClientError(f"--check: {name}: the result holds no {LABELS} (not requested)", 2)
        image = result.image if result.image is not None else decode(name, data)
        expected = session.run([LABELS], {IMAGES: image[np.newaxis]})[0][0]
        if expected.shape != result.labels.shape:
            raise ClientError(
                f"--check: {name}: server labels {result.labels.shape} vs onnxruntime {expected.shape}", 1
            )
        same += int((expected == result.labels).sum())
        total += expected.size
    return same / max(total, 1)
