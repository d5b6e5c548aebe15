"""The long-tail benchmark: baseline, focal, reweight and MEDOE (both stage-2 balancing
settings) with the same backbone, data and budget, evaluated on a held-out split.

    python -m training.benchmark                       # CPU budget, about 40 minutes on 2 cores
    python -m training.benchmark --device cuda --iters 8000

Writes docs/benchmark_longtail.md and .json. The synthetic "test" split is the held-out one:
tuning looks at "val" only, so the reported numbers never steered a choice.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from medoe.checkpoint import load_checkpoint
from medoe.model import count_parameters
from medoe.report import (
    DOCS_DIR,
    command_line,
    goal,
    goals_markdown,
    header_markdown,
    machine_info,
    now,
    write_report,
)
from training import train
from training.common import get_dataset, load_config
from training.evaluate import evaluate, format_table
from training.plots import plot_comparison

BASELINES = ("baseline", "focal", "reweight")
# Stage 2 without and with the balancing flag; the config's power (0.5 for the synthetic
# configs, tuned on "val") and plain inverse frequency (power 1).
MEDOE_RUNS = {
    "medoe": ["--no-select-balance"],
    "medoe_balanced": ["--select-balance"],
    "medoe_balanced_inverse": ["--select-balance", "--select-balance-power", "1.0"],
}


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default="deeplabv3plus_tiny_synthetic_cpu", help="training config shared by every run")
    parser.add_argument("--iters", type=int, help="stage-1 / baseline iterations (default: the config's)")
    parser.add_argument("--stage2-iters", type=int, help="stage-2 iterations (default: the config's)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="training and evaluation device")
    parser.add_argument("--split", default="test", help="held-out split the table reports")
    parser.add_argument("--work-dir", default="work/benchmark", help="where the runs go")
    parser.add_argument("--out-dir", default=str(DOCS_DIR), help="where benchmark_longtail.{md,json} go")
    parser.add_argument("--only", nargs="+", help="run a subset (for tuning), e.g. --only baseline medoe")
    return parser.parse_args(argv)


def run_training(args, name: str, extra: list[str]) -> float:
    flags = ["--config", args.config, "--work-dir", str(Path(args.work_dir) / name), "--device", args.device, "--no-eval", "--resume", *extra]
    if args.iters:
        flags += ["--iters", str(args.iters)]
    if args.stage2_iters:
        flags += ["--stage2-iters", str(args.stage2_iters)]
    tic = time.perf_counter()
    if train.main(flags) != 0:
        raise SystemExit(f"training {name} failed")
    return time.perf_counter() - tic


def train_all(args, names: list[str]) -> dict[str, float]:
    seconds = {}
    for name in [n for n in BASELINES if n in names]:
        seconds[name] = run_training(args, name, ["--model", name])
    medoe = [n for n in MEDOE_RUNS if n in names]
    if medoe:
        # Stage 1 is shared: both balancing settings start from the same experts.
        first = medoe[0]
        seconds[first] = run_training(args, first, ["--model", "medoe", *MEDOE_RUNS[first]])
        for other in medoe[1:]:
            source, target = Path(args.work_dir) / first, Path(args.work_dir) / other
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            shutil.copytree(source / "stage1", target / "stage1")
            shutil.copy(source / "class_stats.json", target / "class_stats.json")
            seconds[other] = run_training(args, other, ["--model", "medoe", "--stage", "2", *MEDOE_RUNS[other]])
    return seconds


def main(argv=None) -> int:
    args = get_args(argv)
    names = args.only or [*BASELINES, *MEDOE_RUNS]
    unknown = sorted(set(names) - {*BASELINES, *MEDOE_RUNS})
    if unknown:
        print(f"error: unknown run(s) {unknown}; choose from {[*BASELINES, *MEDOE_RUNS]}", file=sys.stderr)
        return 2
    try:  # a bad config is one line and exit 2 here, not "training baseline failed" after the first run
        load_config(args.config)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    seconds = train_all(args, names)
    device = torch.device(args.device)
    results, params = {}, {}
    for name in names:
        checkpoint = load_checkpoint(Path(args.work_dir) / name / "final", device)
        dataset = get_dataset(checkpoint.config, args.split)
        results[name] = evaluate(checkpoint.model, dataset, device, checkpoint.config, checkpoint.class_stats)
        params[name] = count_parameters(checkpoint.model)
    config = checkpoint.config
    goals = []
    if "baseline" in results:
        base = results["baseline"]
        for name in [n for n in MEDOE_RUNS if n in results]:
            m = results[name]
            goals += [
                goal(f"{name}_tail_mAcc_gain_over_baseline", m["groups"]["tail"]["mAcc"] - base["groups"]["tail"]["mAcc"], 3.0, ">="),
                goal(f"{name}_mIoU_drop_vs_baseline", base["mIoU"] - m["mIoU"], 0.5, "<="),
                goal(f"{name}_oracle_mIoU_minus_medoe", m["oracle"]["mIoU"] - m["mIoU"], 0.01, ">="),
            ]
    report = {
        "machine": machine_info(), "date": now(), "command": command_line("training.benchmark", argv),
        "config": config.to_dict(), "split": args.split, "held_out_images": len(dataset),
        "train_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(time.perf_counter() - started, 1),
        "params": params, "results": results, "goals": goals,
    }
    lines = header_markdown("Long-tail benchmark: MEDOE vs. baselines (synthetic street scenes)", report)
    lines += [
        f"Backbone `{config.backbone}`, context `{config.context}`, {config.iters} iterations of batch "
        f"{config.batch_size} at {config.crop_size[0]}x{config.crop_size[1]} (MEDOE: plus {config.stage2_iters} "
        f"stage-2 iterations), evaluated on {len(dataset)} held-out `{args.split}` images "
        f"({config.synthetic_size[0]}x{config.synthetic_size[1]}). Percent; groups by pixel share (80% / 95%).", "",
        format_table(results), "",
        "| run | parameters | training seconds |", "|---|---:|---:|",
        *[f"| {n} | {params[n]:,} | {seconds.get(n, 0):.0f} |" for n in names], "",
        *goals_markdown(goals), "",
        f"Total wall time {report['total_seconds'] / 60:.1f} min. Per-class IoU/Acc and pixel counts are in "
        "`benchmark_longtail.json` (`results.<run>.per_class`).",
    ]
    plot = Path(args.out_dir) / "benchmark_longtail_per_class.png"
    plot_comparison(results, checkpoint.class_stats, plot, metric="Acc", title=f"Per-class Acc on held-out {args.split}")
    lines += ["", f"![per-class accuracy against training pixel frequency]({plot.name})"]
    write_report(Path(args.out_dir), "benchmark_longtail", report, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
