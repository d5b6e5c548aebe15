"""Per-class IoU/Acc against training pixel frequency, in the style of the paper's Figures 3 and 6.

Classes run left to right from the most to the least frequent training class; the head, body
and tail regions are shaded and a log-scale line on the right axis shows each class's pixel
share. Uses matplotlib's object API with the Agg canvas: no display, no pyplot global state,
so it is safe in headless jobs and in threads.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from medoe.class_stats import DEFAULT_THRESHOLDS, ClassStats
from medoe.io import atomic_write_bytes

GROUP_COLOURS = {"head": "#4c72b0", "body": "#dd8452", "tail": "#c44e52"}
RUN_COLOURS = ["#4c72b0", "#c44e52", "#55a868", "#8172b3", "#dd8452", "#937860", "#da8bc3", "#8c8c8c"]


def plot_path(metrics_path: str | Path) -> Path:
    """metrics.json -> metrics_per_class.png, beside it."""
    path = Path(metrics_path)
    return path.with_name(f"{path.stem}_per_class.png")


def _per_class(metrics: dict, key: str, stats: ClassStats) -> np.ndarray:
    rows = metrics["per_class"]
    if len(rows) != stats.num_classes:
        raise ValueError(
            f"metrics have {len(rows)} classes but the class statistics have {stats.num_classes}; "
            "use the class_stats.json of the checkpoint that produced the metrics"
        )
    # None (class absent from the evaluated split) becomes NaN: no bar instead of a zero bar.
    return np.array([math.nan if r[key] is None else float(r[key]) for r in rows])


def _frame(figure: Figure, stats: ClassStats, title: str):
    """Axes with the frequency order, shaded groups and the pixel-share line; returns (axes, share axes, order)."""
    order = stats.ranking()
    axes = figure.add_subplot(1, 1, 1)
    rank_of = {c: i for i, c in enumerate(order)}
    try:
        groups = stats.group_dict(DEFAULT_THRESHOLDS)
    except ValueError:  # too few classes for three groups: plot without regions
        groups = {}
    for name, members in groups.items():
        ranks = [rank_of[c] for c in members]
        if ranks:
            colour = GROUP_COLOURS.get(name, "#999999")
            axes.axvspan(min(ranks) - 0.5, max(ranks) + 0.5, color=colour, alpha=0.1, lw=0, zorder=0)
            axes.axvline(max(ranks) + 0.5, color="#777777", lw=0.8, ls="--", zorder=1)
            axes.text(
                (min(ranks) + max(ranks)) / 2,
                104,
                f"{name} ({len(ranks)})",
                ha="center",
                va="bottom",
                fontsize=9,
                color=colour,
                fontweight="bold",
            )
    axes.set_xlim(-0.5, len(order) - 0.5)
    axes.set_ylim(0, 112)
    axes.set_yticks(range(0, 101, 20))
    axes.set_ylabel("percent")
    axes.set_xticks(range(len(order)))
    axes.set_xticklabels([stats.class_names[c] for c in order], rotation=60, ha="right", fontsize=8)
    axes.set_title(title, fontsize=11, pad=24)
    axes.grid(axis="y", alpha=0.3)
    share = stats.pixel_share[order] * 100
    twin = axes.twinx()
    # Zero-pixel classes cannot sit on a log axis: clip them to a visible floor.
    floor = min((s for s in share if s > 0), default=1e-3) / 10
    share = np.maximum(share, floor)
    twin.plot(range(len(order)), share, color="#333333", marker=".", lw=1, ls=":", label="train pixel share")
    twin.set_yscale("log")
    # Headroom above the most frequent class keeps the line clear of the group labels.
    twin.set_ylim(share.min() / 2, share.max() * 4)
    twin.set_ylabel("training pixel share (%, log)")
    return axes, twin, order


def _save(figure: Figure, path: str | Path) -> Path:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _size(num_classes: int) -> tuple[float, float]:
    return (max(7.0, 0.45 * num_classes + 2.5), 5.0)


def plot_per_class(metrics: dict, stats: ClassStats, path: str | Path, title: str | None = None) -> Path:
    """IoU and Acc bars per class (and MEDOE's oracle Acc as a marker when present)."""
    iou, acc = _per_class(metrics, "IoU", stats), _per_class(metrics, "Acc", stats)
    figure = Figure(figsize=_size(stats.num_classes))
    heading = title or f"per-class results (mIoU {metrics.get('mIoU') or 0:.1f}, mAcc {metrics.get('mAcc') or 0:.1f})"
    axes, twin, order = _frame(figure, stats, heading)
    x = np.arange(len(order))
    axes.bar(x - 0.2, iou[order], width=0.4, color="#4c72b0", label="IoU")
    axes.bar(x + 0.2, acc[order], width=0.4, color="#55a868", label="Acc")
    if "oracle" in metrics:
        oracle = _per_class(metrics["oracle"], "Acc", stats)
        axes.scatter(x + 0.2, oracle[order], marker="_", s=120, color="black", zorder=3, label="oracle Acc")
    handles = axes.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles), fontsize=8, frameon=False
    )
    return _save(figure, path)


def plot_comparison(
    results: dict[str, dict], class_stats: ClassStats, path: str | Path, metric: str = "Acc", title: str | None = None
) -> Path:
    """Several runs' per-class `metric` ("Acc" or "IoU") side by side against training frequency."""
    if not results:
        raise ValueError("plot_comparison needs at least one run's metrics")
    if metric not in ("Acc", "IoU"):
        raise ValueError(f"metric must be 'Acc' or 'IoU', got {metric!r}")
    figure = Figure(figsize=_size(class_stats.num_classes * max(1, len(results)) ** 0.5))
    axes, twin, order = _frame(figure, class_stats, title or f"per-class {metric} by training frequency")
    x = np.arange(len(order))
    width = 0.8 / len(results)
    for k, (name, metrics) in enumerate(results.items()):
        values = _per_class(metrics, metric, class_stats)[order]
        mean = metrics.get("mAcc" if metric == "Acc" else "mIoU")
        label = name if mean is None else f"{name} ({mean:.1f})"
        axes.bar(x - 0.4 + width * (k + 0.5), values, width=width, color=RUN_COLOURS[k % len(RUN_COLOURS)], label=label)
    handles = axes.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    axes.legend(
        handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(handles), fontsize=8, frameon=False
    )
    return _save(figure, path)


def plot_alpha_sweep(points: list[tuple[float, float, float]], path: str | Path) -> Path:
    """Figure 5: (alpha, mIoU, tail mAcc) points of one recipe, as two lines against alpha."""
    points = sorted(points)
    figure = Figure(figsize=(5, 3.2))
    axes = figure.add_subplot()
    alphas = [p[0] for p in points]
    axes.plot(alphas, [p[1] for p in points], "o-", color=RUN_COLOURS[0], label="mIoU")
    axes.plot(alphas, [p[2] for p in points], "s--", color=RUN_COLOURS[1], label="tail mAcc")
    axes.set_xlabel("alpha (weight of the L2 + KL terms)")
    axes.set_ylabel("percent")
    axes.legend(frameon=False)
    figure.tight_layout()
    return _save(figure, path)
