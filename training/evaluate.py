"""Evaluate a checkpoint: aAcc, mIoU, mAcc, head/body/tail means, per class, and the oracle.

    python -m training.evaluate --checkpoint work/run/final --dataset synthetic --split val \
        --out metrics.json [--save-preds PRED_DIR]
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
from medoe.config import MEDOEConfig
from medoe.data import DatasetError
from medoe.metrics import ConfusionMatrix
from medoe.model import MEDOE
from training.common import get_dataset, write_json


@torch.no_grad()
def evaluate(model, dataset, device, config: MEDOEConfig, stats: ClassStats, save_preds: Path | None = None, batch_size: int = 4) -> dict:
    """Whole-image inference over `dataset`; returns metrics.json's content (percent)."""
    model.eval()
    num_classes = config.num_classes
    matrix = ConfusionMatrix(num_classes, config.ignore_index, device)
    oracle = ConfusionMatrix(num_classes, config.ignore_index, device) if isinstance(model, MEDOE) else None
    # Differently sized images (ADE20K) cannot share a batch.
    loader = DataLoader(dataset, batch_size=batch_size if config.dataset == "synthetic" else 1)
    index = 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        predicted = model(images).labels
        matrix.update(predicted, labels)
        if oracle is not None:
            oracle.update(model.oracle(images, labels).labels, labels)
        if save_preds is not None:
            save_preds.mkdir(parents=True, exist_ok=True)
            for prediction in predicted.to(torch.uint8).cpu().numpy():
                cv2.imwrite(str(save_preds / f"{dataset.sample_name(index)}.png"), prediction)
                index += 1
    groups = stats.group_dict(DEFAULT_THRESHOLDS)
    matrix.all_reduce()
    metrics = matrix.compute().to_dict(config.class_names or stats.class_names, groups)
    if oracle is not None:
        oracle.all_reduce()
        metrics["oracle"] = oracle.compute().to_dict(config.class_names or stats.class_names, groups)
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


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Evaluate a MEDOE or baseline checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (e.g. work/run/final)")
    parser.add_argument("--dataset", choices=["synthetic", "cityscapes", "ade20k", "folder"], help="default: the checkpoint's dataset")
    parser.add_argument("--data-root", help="dataset root (not needed for synthetic)")
    parser.add_argument("--split", default="val", help="split to evaluate")
    parser.add_argument("--out", required=True, help="where to write metrics.json")
    parser.add_argument("--save-preds", help="write one label PNG per image here (values = class index)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="inference device")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        checkpoint = load_checkpoint(args.checkpoint, args.device)
        config = checkpoint.config
        if args.dataset:
            config = config.replace(dataset=args.dataset)
        if args.data_root:
            config = config.replace(data_root=args.data_root)
        if checkpoint.class_stats is None:
            raise CheckpointError(f"{args.checkpoint} has no class_stats.json (needed for head/body/tail)")
        dataset = get_dataset(config, args.split, train=False)
        metrics = evaluate(checkpoint.model, dataset, torch.device(args.device), config, checkpoint.class_stats,
                           Path(args.save_preds) if args.save_preds else None)
    except (CheckpointError, DatasetError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_json(Path(args.out), metrics)
    table = format_table({config.model: metrics})
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
