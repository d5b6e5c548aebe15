"""Parity of an exported graph against its reference: every float output within `atol`,
labels agreeing on `min_agreement` of the pixels, reported per class and per group."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from export.graph import random_images
from medoe.contract import IMAGES, LABELS


def run_onnxruntime(session, images: np.ndarray, names) -> dict[str, np.ndarray]:
    return dict(zip(names, session.run(list(names), {IMAGES: images}), strict=True))


@dataclass
class Parity:
    """Accumulates the candidate-vs-reference differences of many runs."""

    class_names: list[str]
    groups: dict[str, list[int]]
    atol: float = 1e-4
    min_agreement: float = 0.9999
    max_abs: dict[str, float] = field(default_factory=dict)
    pixels: np.ndarray | None = None  # reference label count per class
    agreed: np.ndarray | None = None  # ... of which the candidate gave the same label
    problems: list[str] = field(default_factory=list)

    def add(self, reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], where: str) -> None:
        num_classes = len(self.class_names)
        if self.pixels is None:
            self.pixels, self.agreed = np.zeros(num_classes, np.int64), np.zeros(num_classes, np.int64)
        for name, expected in reference.items():
            got = candidate[name]
            if got.shape != expected.shape or got.dtype != expected.dtype:
                self.problems.append(
                    f"{name} at {where}: got {got.dtype}{list(got.shape)}, expected "
                    f"{expected.dtype}{list(expected.shape)}"
                )
            elif name == LABELS:
                truth = expected.ravel().astype(np.int64)
                self.pixels += np.bincount(truth, minlength=num_classes)[:num_classes]
                self.agreed += np.bincount(truth[got.ravel() == expected.ravel()], minlength=num_classes)[:num_classes]
            else:
                delta = float(np.abs(got.astype(np.float64) - expected).max()) if expected.size else 0.0
                self.max_abs[name] = max(self.max_abs.get(name, 0.0), delta)

    @property
    def agreement(self) -> float:
        return float(self.agreed.sum() / max(self.pixels.sum(), 1)) if self.pixels is not None else 1.0

    def failures(self) -> list[str]:
        failed = list(self.problems)
        failed += [f"max |delta {n}| {d:.2e} > {self.atol:g}" for n, d in self.max_abs.items() if not d <= self.atol]
        if self.agreement < self.min_agreement:
            failed.append(f"label agreement {100 * self.agreement:.4f}% < {100 * self.min_agreement:.4f}%")
        return failed

    def report(self) -> list[str]:
        group_of = {c: g for g, members in self.groups.items() for c in members}
        width = max([len(n) for n in self.class_names] + [5])
        lines = [f"  {'class':<{width}}  group  {'pixels':>10}  agreement"]
        for c, name in enumerate(self.class_names):
            if self.pixels is not None and self.pixels[c]:
                lines.append(
                    f"  {name:<{width}}  {group_of.get(c, '-'):<5}  {self.pixels[c]:>10}  "
                    f"{100 * self.agreed[c] / self.pixels[c]:8.4f}%"
                )
        for group, members in self.groups.items():
            total = int(self.pixels[members].sum()) if self.pixels is not None and members else 0
            if total:
                lines.append(
                    f"  {'[' + group + ']':<{width}}  {group:<5}  {total:>10}  "
                    f"{100 * self.agreed[members].sum() / total:8.4f}%"
                )
        lines.append(
            f"  label agreement {100 * self.agreement:.4f}% over "
            f"{int(self.pixels.sum()) if self.pixels is not None else 0} pixels; "
            + ", ".join(f"max |delta {n}| {d:.2e}" for n, d in self.max_abs.items())
        )
        return lines


def verify(run_reference, run_candidate, sizes, batches, parity: Parity) -> Parity:
    """Runs both on the same random uint8 images at every (batch, size)."""
    for index, (batch, (height, width)) in enumerate((b, s) for s in sizes for b in batches):
        images = random_images(batch, height, width, seed=index)
        parity.add(run_reference(images), run_candidate(images), f"{batch}x{height}x{width}")
    return parity
