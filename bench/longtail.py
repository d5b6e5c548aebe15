"""The long-tail benchmark: baselines and MEDOE with the same backbone, data and budget, on two
generated domains (street scenes and aerial suburbs), evaluated on their held-out `test` splits.

    python -m bench.longtail                  # 300 + 200 iterations: 56 minutes on 2 cores (measured 2026-12-03)
    python -m bench.longtail --alpha-sweep    # + Figure 5 (three more MEDOE runs)
    python -m bench.longtail --split val --out-dir work/tune        # for tuning
    python -m bench.longtail --split val --seed 1 --work-dir work/seed1 --out-dir work/seed1   # seed spread
    python -m bench.longtail --device cuda --iters 8000

Per domain: baseline, reweight (`--only ... focal` adds focal), `medoe_paper` (the paper's
recipe, every lever of docs/method.md §8 off), `medoe` (the configs' recipe: what ships;
re-weighted experts, expert 1 without its KL term, refine mixing with the blend inside the
groups, stage 2 fitted to the output: §8's sixth round), `medoe_nested` (the paper's stage 1
again, nested mixing and a 3x3 decision maker) and `medoe_levers` (the levers of the first
round on); `--only` can also name the `medoe_reweighted*` runs (docs/method.md's third to
sixth rounds). For every MEDOE run the diagnostics of
training/diagnostics.py: each expert alone, the oracle, the paper's
user-specified ensembles (Table 6), each expert's mAcc, bias and calibration (Table 9) and the
decision maker's selection accuracy on its own training images against held-out ones. With
`--alpha-sweep`, the shipped recipe at alpha in {0, 0.1, 0.2, 0.5} on the first domain (Figure 5).

Writes docs/benchmark_longtail.{md,json} and plots. Tuning looks at `val` only, so the
reported `test` numbers never steered a choice. Finished runs in --work-dir are reused.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from bench import report as reporting
from bench.longtail_report import goals_for, markdown
from medoe.checkpoint import load_checkpoint
from medoe.class_stats import ClassStats
from medoe.config import load_config
from medoe.io import atomic_write_text
from medoe.model import MEDOE, count_parameters
from training import train
from training.common import Subset, get_dataset, split_holdout
from training.diagnostics import expert_diagnostics
from training.evaluate import evaluate
from training.plots import plot_alpha_sweep, plot_comparison

DOMAINS = {"streets": "deeplabv3plus_tiny_synthetic_cpu", "aerial": "deeplabv3plus_tiny_aerial_cpu"}
BASELINES = {"baseline": ["--model", "baseline"], "focal": ["--model", "focal"], "reweight": ["--model", "reweight"]}
# The paper's losses, whatever the configs' defaults: plain CE experts, every one with its KL term
# over its whole set, the decision maker fitted to the owner expert. Later flags of a run win.
PAPER_LOSSES = ["--no-expert-reweight", "--expert1-aux", "--kl-support", "set", "--stage2-loss", "selection"]
# The paper's MEDOE: plain CE experts, stage 2 on the images stage 1 fitted, a 1x1 decision maker,
# p = sum_k s_k p_k, no selection balance.
PAPER = [
    *PAPER_LOSSES,
    "--expert-balance",
    "0",
    "--stage2-holdout",
    "0",
    "--decision-kernel",
    "1",
    "--mixing",
    "paper",
    "--no-blend-within",
    "--no-select-balance",
]
# Every lever of docs/method.md §8 on.
LEVERS = [
    *PAPER_LOSSES,
    "--expert-balance",
    "1",
    "--stage2-holdout",
    "0.2",
    "--decision-kernel",
    "3",
    "--mixing",
    "nested",
    "--no-blend-within",
    "--select-balance",
    "--select-balance-power",
    "0.5",
]
# The paper's experts (its stage 1), combined by nested mixing with a 3x3 decision maker trained
# on the true group frequencies (the best stage 2 on `val`, docs/method.md §8).
GROUP_DECISION = [
    *PAPER_LOSSES,
    "--expert-balance",
    "0",
    "--stage2-holdout",
    "0",
    "--decision-kernel",
    "3",
    "--no-blend-within",
    "--no-select-balance",
]
NESTED = [*GROUP_DECISION, "--mixing", "nested"]
# The same with expert 1's group mass as the prior (docs/method.md §8 `refine`).
REFINE = [*GROUP_DECISION, "--mixing", "refine"]
E1CE_REFINE = [
    "--model",
    "medoe",
    *REFINE,
    "--expert-reweight",
    "--no-expert1-aux",
    "--stage2-loss",
    "output",
]
MEDOE_RUNS = {
    "medoe_paper": ["--model", "medoe", *PAPER],
    "medoe": ["--model", "medoe"],
    "medoe_nested": ["--model", "medoe", *NESTED],
    "medoe_levers": ["--model", "medoe", *LEVERS],
    # Every expert's CE re-weighted by 1/sqrt(frequency) inside its own set (expert 1: reweight's
    # loss), combined as the paper does and by nested mixing.
    "medoe_reweighted": ["--model", "medoe", *PAPER, "--expert-reweight"],
    "medoe_reweighted_nested": ["--model", "medoe", *NESTED, "--expert-reweight"],
    # Those two stage 2s with a decision maker that also reads the backbone's last map.
    "medoe_reweighted_features": ["--model", "medoe", *PAPER, "--expert-reweight", "--decision-features"],
    "medoe_reweighted_nested_features": ["--model", "medoe", *NESTED, "--expert-reweight", "--decision-features"],
    # The same experts, the decision maker fitted to the mixture's likelihood of the label
    # (class-weighted as the experts were) instead of to the owner expert.
    "medoe_reweighted_output": ["--model", "medoe", *PAPER, "--expert-reweight", "--stage2-loss", "output"],
    "medoe_reweighted_nested_output": ["--model", "medoe", *NESTED, "--expert-reweight", "--stage2-loss", "output"],
    # Expert 1's own group decision, refined inside each group by the group's expert (§8 `refine`).
    "medoe_reweighted_refine": ["--model", "medoe", *REFINE, "--expert-reweight", "--stage2-loss", "output"],
    # Those experts with the KL term over the classes present in the batch (§8 `kl_support`), and
    # with no auxiliary term at all (expert 1's loss is then exactly reweight's).
    "medoe_reweighted_kl": ["--model", "medoe", *PAPER, "--expert-reweight", "--kl-support", "present"],
    "medoe_reweighted_kl_refine": [
        "--model",
        "medoe",
        *REFINE,
        "--expert-reweight",
        "--kl-support",
        "present",
        "--stage2-loss",
        "output",
    ],
    # Expert 1 without its KL term (its loss exactly reweight's), experts 2..K with theirs.
    "medoe_reweighted_e1ce_refine": E1CE_REFINE,
    # The same experts; inside each group the decision maker also blends expert 1's own
    # distribution with the specialist's (§8 `blend_within`). What the configs ship.
    "medoe_reweighted_e1ce_blend": [*E1CE_REFINE, "--blend-within"],
    "medoe_reweighted_noaux_refine": [
        "--model",
        "medoe",
        *REFINE,
        "--expert-reweight",
        "--alpha",
        "0",
        "--stage2-loss",
        "output",
    ],
}
# These differ from another run in stage 2 only and reuse its stage 1.
SHARES_STAGE1 = {
    "medoe_nested": "medoe_paper",
    "medoe_reweighted_nested": "medoe_reweighted",
    "medoe_reweighted_features": "medoe_reweighted",
    "medoe_reweighted_nested_features": "medoe_reweighted",
    "medoe_reweighted_output": "medoe_reweighted",
    "medoe_reweighted_nested_output": "medoe_reweighted",
    "medoe_reweighted_refine": "medoe_reweighted",
    "medoe_reweighted_kl_refine": "medoe_reweighted_kl",
    "medoe_reweighted_e1ce_blend": "medoe_reweighted_e1ce_refine",
}
DEFAULT_RUNS = ("baseline", "reweight", "medoe_paper", "medoe", "medoe_nested", "medoe_levers")  # focal: with --only
ALPHAS = (0.0, 0.1, 0.2, 0.5)  # Figure 5
# The CPU budget: every run, both domains, in 56 minutes on 2 cores (measured 2026-12-03; 60 at most, issue 12).
CPU_ITERS, CPU_STAGE2_ITERS = 300, 200
STAGE2_TRAIN_IMAGES = 50  # of the decision maker's own training images, for train-vs-held-out selection


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=list(DOMAINS), help="datasets to run")
    parser.add_argument(
        "--config", help="one domain from this config (a name in configs/ or a JSON path) instead of --domains"
    )
    parser.add_argument("--only", nargs="+", help="a subset of runs, e.g. --only reweight medoe")
    parser.add_argument(
        "--alpha-sweep",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Figure 5's alpha sweep of the shipped recipe on the first domain (+3 MEDOE runs)",
    )
    parser.add_argument(
        "--iters", type=int, default=CPU_ITERS, help="stage-1 / baseline iterations (the configs': 1200)"
    )
    parser.add_argument("--stage2-iters", type=int, default=CPU_STAGE2_ITERS, help="stage-2 iterations")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="training and evaluation device")
    parser.add_argument(
        "--seed", type=int, help="training seed of every run (default: the configs'); the data stay the same"
    )
    parser.add_argument("--split", default="test", help="held-out split the tables report")
    parser.add_argument("--work-dir", default="work/benchmark", help="where the runs go (finished runs are reused)")
    parser.add_argument("--out-dir", default=str(reporting.DOCS_DIR), help="where benchmark_longtail.{md,json} go")
    args = parser.parse_args(argv)
    args.configs = {Path(args.config).stem: args.config} if args.config else {d: DOMAINS[d] for d in args.domains}
    args.domains = list(args.configs)
    return args


def plan(args) -> dict[str, dict[str, list[str]]]:
    """domain -> run name -> train.py flags."""
    runs = {**BASELINES, **MEDOE_RUNS}
    unknown = sorted(set(args.only or []) - set(runs))
    if unknown:
        raise ValueError(f"unknown run(s) {unknown}; choose from {list(runs)}")
    wanted = args.only or DEFAULT_RUNS
    chosen = {name: flags for name, flags in runs.items() if name in wanted}
    planned = {domain: dict(chosen) for domain in args.domains}
    if args.alpha_sweep and "medoe" in chosen:
        shipped_alpha = load_config(args.configs[args.domains[0]]).alpha
        for alpha in ALPHAS:
            if alpha != shipped_alpha:
                planned[args.domains[0]][f"medoe_alpha{alpha:g}"] = ["--model", "medoe", "--alpha", str(alpha)]
    return planned


def run_training(args, domain: str, name: str, flags: list[str]) -> float:
    work = Path(args.work_dir) / domain / name
    timing = work / "train_seconds.txt"
    if (work / "final").is_dir():  # finished earlier: reused, with the time it took then
        return float(timing.read_text()) if timing.is_file() else float("nan")
    source = Path(args.work_dir) / domain / SHARES_STAGE1.get(name, name)
    # A run that shares another's stage 1 trains its own when that run is not in the work dir.
    if source != work and not (work / "stage1").is_dir() and (source / "stage1").is_dir():
        shutil.copytree(source / "stage1", work / "stage1")
        shutil.copy(source / "class_stats.json", work / "class_stats.json")
    argv = [
        "--config",
        args.configs[domain],
        "--work-dir",
        str(work),
        "--device",
        args.device,
        "--no-eval",
        *flags,
        "--iters",
        str(args.iters),
        "--stage2-iters",
        str(args.stage2_iters),
        *(["--seed", str(args.seed)] if args.seed is not None else []),
    ]
    if (work / "stage1").is_dir():  # stage 1 is done (here or in the run it shares): stage 2 alone
        shutil.rmtree(work / "last", ignore_errors=True)
        argv += ["--stage", "2"]
    else:
        argv += ["--resume"]
    tic = time.perf_counter()
    if train.main(argv) != 0:
        raise SystemExit(f"training {domain}/{name} failed")
    seconds = time.perf_counter() - tic
    atomic_write_text(timing, f"{seconds:.1f}\n")
    return seconds


def score(args, domain: str, name: str, device) -> dict:
    checkpoint = load_checkpoint(Path(args.work_dir) / domain / name / "final", device)
    model, config, stats = checkpoint.model, checkpoint.run, checkpoint.class_stats
    held_out = get_dataset(config, args.split)
    result = {"params": count_parameters(model), "config": config.to_dict(), "images": len(held_out)}
    if isinstance(model, MEDOE):
        stage2_images = split_holdout(get_dataset(config, "train"), config.stage2_holdout, config.seed)[1]
        seen = Subset(stage2_images, range(min(STAGE2_TRAIN_IMAGES, len(stage2_images))))
        result["diagnostics"] = expert_diagnostics(model, held_out, device, config, stats)
        result["diagnostics_stage2_images"] = expert_diagnostics(model, seen, device, config, stats)["experts"]
        # The diagnostics' moe and oracle rules are evaluate()'s numbers (tests/test_longtail_levers.py), in one pass.
        rules = result["diagnostics"]["rules"]
        result["metrics"] = {**rules["moe"], "oracle": rules["oracle"]}
    else:
        result["metrics"] = evaluate(model, held_out, device, config, stats)
    return result


def main(argv=None) -> int:
    args = get_args(argv)
    try:  # a bad name or config is one line and exit 2 here, not a failure after the first run
        for domain in args.domains:
            load_config(args.configs[domain])
        planned = plan(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    device = torch.device(args.device)
    domains = {}
    for domain, runs in planned.items():
        seconds = {name: run_training(args, domain, name, flags) for name, flags in runs.items()}
        scored = {name: score(args, domain, name, device) for name in runs}
        # Every run of a domain trains on the same images: any run's statistics serve the plot and groups.
        stats = ClassStats.load(Path(args.work_dir) / domain / next(iter(runs)) / "class_stats.json")
        plot = Path(args.out_dir) / f"benchmark_longtail_{domain}_per_class.png"
        main_runs = {n: r["metrics"] for n, r in scored.items() if not n.startswith("medoe_alpha")}
        plot_comparison(main_runs, stats, plot, metric="Acc", title=f"{domain}: per-class Acc on held-out {args.split}")
        domains[domain] = {
            "config": args.configs[domain],
            "train_seconds": {k: round(v, 1) for k, v in seconds.items()},
            "runs": scored,
            "plot": plot.name,
            "groups": {g: [stats.class_names[c] for c in m] for g, m in stats.group_dict().items()},
        }
    first = domains[args.domains[0]]
    alpha_runs = {n: r for n, r in first["runs"].items() if n == "medoe" or n.startswith("medoe_alpha")}
    alpha_plot = None
    if len(alpha_runs) > 1:
        points = [
            (r["config"]["alpha"], r["metrics"]["mIoU"], r["metrics"]["groups"]["tail"]["mAcc"])
            for r in alpha_runs.values()
        ]
        alpha_plot = plot_alpha_sweep(points, Path(args.out_dir) / "benchmark_longtail_alpha.png").name
    report = {
        **reporting.provenance("bench.longtail", argv),
        "split": args.split,
        "domains": domains,
        "alpha_plot": alpha_plot,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    report["goals"] = [
        g
        for domain, d in domains.items()
        for g in goals_for(domain, d["runs"], [n for n in MEDOE_RUNS if n != "medoe_paper"])
    ]
    lines = markdown(report)
    reporting.write_report(Path(args.out_dir), "benchmark_longtail", report, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
