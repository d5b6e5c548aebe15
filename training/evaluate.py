"""Evaluate a checkpoint: aAcc, mIoU, mAcc, head/body/tail means, per class, and the oracle.

    python -m training.evaluate --checkpoint work/run/final --dataset synthetic --split val \
        --out metrics.json [--save-preds PRED_DIR] [--slide]

Writes metrics.json, metrics.md (the head/body/tail table and a per-class table) and
metrics_per_class.png (per-class IoU/Acc against training pixel frequency).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from medoe.checkpoint import CheckpointError, load_checkpoint
from medoe.class_stats import DEFAULT_THRESHOLDS, ClassStats
from medoe.config import DATASETS, GENERATED, TrainConfig
from medoe.data import DatasetError
from medoe.io import atomic_write_text
from medoe.metrics import ConfusionMatrix
from medoe.model import MEDOE
from training.common import get_dataset, write_json
from training.inference import default_stride, slide_inference
from training.plots import plot_path, plot_per_class


@torch.no_grad()
def evaluate(
    model,
    dataset,
    device,
    config: TrainConfig,
    stats: ClassStats,
    save_preds: Path | None = None,
    batch_size: int = 4,
    slide: bool = False,
) -> dict:
    """Inference over all of `dataset` in this process; returns metrics.json's content (percent).

    Whole-image inference by default; `slide` runs windows of the training crop instead
    (training/inference.py), so the network sees inputs of the size it was trained on.
    """
    model.eval()
    num_classes = config.network.num_classes
    matrix = ConfusionMatrix(num_classes, config.network.ignore_index, device)
    oracle = ConfusionMatrix(num_classes, config.network.ignore_index, device) if isinstance(model, MEDOE) else None
    # Differently sized images (ADE20K) cannot share a batch.
    loader = DataLoader(dataset, batch_size=batch_size if config.dataset in GENERATED else 1)
    index = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        if slide:
            predicted = slide_inference(lambda x, _: model(x), images, config.crop_size).labels
        else:
            predicted = model(images).labels
        matrix.update(predicted, labels)
        if oracle is not None:
            best = (
                slide_inference(model.oracle, images, config.crop_size, labels)
                if slide
                else model.oracle(images, labels)
            )
            oracle.update(best.labels, labels)
        if save_preds is not None:
            save_preds.mkdir(parents=True, exist_ok=True)
            for prediction in predicted.to(torch.uint8).cpu().numpy():
                cv2.imwrite(str(save_preds / f"{dataset.sample_name(index)}.png"), prediction)
                index += 1
    # No all_reduce: this process saw the whole dataset (under torchrun only rank 0 evaluates,
    # and a collective there fails or hangs on ranks that have already finished).
    groups = stats.group_dict(DEFAULT_THRESHOLDS)
    metrics = matrix.compute().to_dict(config.network.class_names or stats.class_names, groups)
    if oracle is not None:
        metrics["oracle"] = oracle.compute().to_dict(config.network.class_names or stats.class_names, groups)
    return metrics


def _cell(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.2f}"


def format_table(results: dict[str, dict]) -> str:
    """The paper's head/body/tail layout (Table 4), one row per model (and per oracle)."""
    header = "| model | mIoU | mAcc | head mIoU | head mAcc | body mIoU | body mAcc | tail mIoU | tail mAcc |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    rows = []
    for name, metrics in results.items():
        rows.append((name, metrics))
        if "oracle" in metrics:
            rows.append((f"{name} (oracle)", metrics["oracle"]))
    for name, m in rows:
        cells = [m["mIoU"], m["mAcc"]]
        for group in ("head", "body", "tail"):
            means = m["groups"].get(group, {})
            cells += [means.get("mIoU"), means.get("mAcc")]
        lines.append(f"| {name} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def per_class_table(metrics: dict, stats: ClassStats) -> str:
    """One row per class, most frequent training class first, with its group and pixel share."""
    owner = {c: name for name, members in stats.group_dict(DEFAULT_THRESHOLDS).items() for c in members}
    share = stats.pixel_share * 100
    oracle = metrics.get("oracle")
    header = "| class | group | train pixels % | IoU | Acc |" + (" oracle Acc |" if oracle else "")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for c in stats.ranking():
        row = metrics["per_class"][c]
        cells = [row["name"], owner.get(c, "-"), f"{share[c]:.3f}", _cell(row["IoU"]), _cell(row["Acc"])]
        if oracle:
            cells.append(_cell(oracle["per_class"][c]["Acc"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a MEDOE or baseline checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. work/run/final)")
    parser.add_argument("--dataset", choices=DATASETS, help="default: the checkpoint's dataset")
    parser.add_argument("--data-root", help="dataset root (not needed for synthetic)")
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--out", required=True, help="where to write metrics.json")
    parser.add_argument("--save-preds", help="write one label PNG per image here (values = class index)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="inference device")
    parser.add_argument(
        "--slide",
        action="store_true",
        help="sliding-window inference with the training crop (stride 2/3 crop) instead of whole images",
    )
    parser.add_argument(
        "--plot", action=argparse.BooleanOptionalAction, default=True, help="write OUT_per_class.png beside --out"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    out = Path(args.out)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda but no CUDA device is available")
        checkpoint = load_checkpoint(args.checkpoint, args.device)
        config = checkpoint.run
        if args.dataset:
            config = config.replace(dataset=args.dataset)
        if args.data_root:
            config = config.replace(data_root=args.data_root)
        stats = checkpoint.class_stats
        if stats is None:
            raise CheckpointError(f"{args.checkpoint} has no class_stats.json (needed for head/body/tail)")
        dataset = get_dataset(config, args.split)
        metrics = evaluate(
            checkpoint.model,
            dataset,
            torch.device(args.device),
            config,
            stats,
            Path(args.save_preds) if args.save_preds else None,
            slide=args.slide,
        )
        mode = (
            (
                f"sliding window {config.crop_size[0]}x{config.crop_size[1]}, stride "
                + "x".join(map(str, default_stride(config.crop_size)))
            )
            if args.slide
            else "whole image"
        )
        write_json(out, metrics)
        table = format_table({config.network.model: metrics})
        lines = [
            f"# {config.network.model} on {config.dataset} `{args.split}` ({len(dataset)} images, {mode})",
            "",
            table,
            "",
            "Per class, most frequent training class first (percent):",
            "",
            per_class_table(metrics, stats),
            "",
        ]
        if args.plot:
            png = plot_per_class(
                metrics, stats, plot_path(out), title=f"{config.network.model}: per-class IoU / Acc ({mode})"
            )
            lines += [f"![per-class IoU and Acc]({png.name})", ""]
        atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    except (CheckpointError, DatasetError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an unwritable --out or --save-preds
        print(f"error: cannot write results: {err}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
