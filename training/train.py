"""Train MEDOE (stage 1, then stage 2) or a single-decoder baseline.

    python -m training.train --config deeplabv3plus_tiny_synthetic_cpu --work-dir work/run
    torchrun --nproc-per-node 4 -m training.train --config deeplabv3plus_r50c_cityscapes \
        --data-root /data/cityscapes --device cuda --work-dir work/cs

Reads top-down: arguments, config, data, class statistics, then one loop per stage.
Every iteration's batch and augmentation are derived from (seed, iteration), so `--resume`
continues with exactly the losses an uninterrupted run would have printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from medoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from medoe.class_stats import ClassStats
from medoe.config import (
    CONFIG_DIR,
    DATASETS,
    KL_SUPPORTS,
    MIXINGS,
    STAGE2_LOSSES,
    ModelConfig,
    TrainConfig,
    load_config,
)
from medoe.data import DatasetError
from medoe.losses import (
    expert_log_priors,
    expert_reweights,
    focal_loss,
    inverse_sqrt_frequency_weights,
    mixture_nll,
    selection_balance_weights,
    selection_loss,
    stage1_loss,
    weighted_ce,
)
from medoe.model import build_model
from medoe.ops import resize
from training import distributed as dist
from training.common import (
    SeededBatches,
    compute_class_stats,
    get_dataset,
    make_loader,
    split_holdout,
)
from training.evaluate import evaluate, format_table


def add_switch(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    """--name / --no-name overriding a boolean config field; absent (None) keeps the config's."""
    parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help)


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--config", default="deeplabv3plus_tiny_synthetic_cpu", help=f"config name in {CONFIG_DIR} or a JSON path"
    )
    parser.add_argument(
        "--model", choices=["medoe", "baseline", "focal", "reweight"], help="override the config's model type"
    )
    parser.add_argument("--work-dir", required=True, help="where checkpoints, class_stats.json and log.jsonl go")
    parser.add_argument("--dataset", choices=DATASETS, help="override the config's dataset")
    parser.add_argument("--data-root", help="dataset root (not needed for synthetic)")
    parser.add_argument("--iters", type=int, help="stage-1 (or baseline) iterations")
    parser.add_argument("--stage2-iters", type=int, help="stage-2 iterations (MEDOE only; 0 = iters // 10)")
    parser.add_argument("--stage", type=int, choices=[1, 2], help="run only this MEDOE stage (2 needs DIR/stage1)")
    parser.add_argument("--batch-size", type=int, help="images per step and process")
    parser.add_argument("--lr", type=float, help="initial learning rate")
    add_switch(parser, "--select-balance", "stage 2: inverse-frequency weights on the expert targets")
    parser.add_argument("--select-balance-power", type=float, help="exponent of those weights: share ** -power")
    parser.add_argument(
        "--stage2-loss",
        choices=list(STAGE2_LOSSES),
        help="stage 2 fits the owner expert (selection, paper) or the mixture's likelihood of the label (output)",
    )
    parser.add_argument("--alpha", type=float, help="weight of the experts' auxiliary (L2 + KL) loss")
    add_switch(
        parser, "--expert1-aux", "expert 1's auxiliary (KL) term (off: its CE alone, alpha acts on experts 2..K)"
    )
    parser.add_argument(
        "--kl-support",
        choices=list(KL_SUPPORTS),
        help="the KL term over all of S_k (set, SPEC) or the classes with pixels in the batch (present)",
    )
    parser.add_argument(
        "--expert-balance", type=float, help="tau of the experts' logit adjustment by their class priors (0 = off)"
    )
    add_switch(
        parser,
        "--expert-reweight",
        "weight each expert's CE by 1/sqrt(class frequency) inside its set (the reweight baseline's loss)",
    )
    parser.add_argument(
        "--stage2-holdout", type=float, help="share of training images held back from stage 1 for stage 2 (0 = off)"
    )
    parser.add_argument(
        "--output-balance", type=float, help="tau of the post-hoc adjustment p(c) / prior(c)^tau (0 = off)"
    )
    add_switch(
        parser, "--stop-gradient", "experts 2..K see detached features (off: their losses train the backbone too)"
    )
    add_switch(parser, "--decision-features", "the decision maker also reads the backbone's last feature map")
    parser.add_argument("--decision-kernel", type=int, choices=[1, 3], help="decision maker's first conv: 1x1 or 3x3")
    parser.add_argument("--mixing", choices=list(MIXINGS), help="how the experts are combined (docs/method.md §8)")
    add_switch(
        parser, "--blend-within", "nested/refine: inside each group, blend expert 1's distribution with the expert's"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="training device")
    parser.add_argument("--seed", type=int, help="seed for data order, augmentation and init")
    parser.add_argument("--workers", type=int, help="DataLoader workers per process")
    parser.add_argument("--save-every", type=int, default=500, help="write DIR/last every N iterations")
    parser.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate DIR/final on the val split at the end",
    )
    parser.add_argument("--resume", action="store_true", help="continue from DIR/last")
    parser.add_argument(
        "--stop-after",
        type=int,
        help="stop (after saving DIR/last) once this run has done N iterations; for preemptible jobs and tests",
    )
    return parser.parse_args(argv)


def config_from_args(args) -> TrainConfig:
    config = load_config(args.config)
    overrides = {
        "model": args.model,
        "dataset": args.dataset,
        "data_root": args.data_root,
        "iters": args.iters,
        "stage2_iters": args.stage2_iters,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "select_balance": args.select_balance,
        "select_balance_power": args.select_balance_power,
        "stage2_loss": args.stage2_loss,
        "seed": args.seed,
        "num_workers": args.workers,
        "alpha": args.alpha,
        "kl_support": args.kl_support,
        "expert1_aux": args.expert1_aux,
        "expert_balance": args.expert_balance,
        "expert_reweight": args.expert_reweight,
        "stage2_holdout": args.stage2_holdout,
        "decision_kernel": args.decision_kernel,
        "decision_features": args.decision_features,
        "mixing": args.mixing,
        "blend_within": args.blend_within,
        "output_balance": args.output_balance,
        "stop_gradient": args.stop_gradient,
    }
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    # A training rule, not a network one: a blended network loads and serves whatever trained it.
    if config.network.blend_within and config.stage2_loss != "output":
        raise ValueError(
            f"blend_within=True needs stage2_loss='output', got {config.stage2_loss!r}: only that loss trains the blend"
        )
    return config


# What stage 2 alone may change on a stage-1 checkpoint (of the run, of the network); the rest
# (the held-back images included) was fixed when stage 1 ran.
STAGE2_RUN_FIELDS = ("select_balance", "select_balance_power", "stage2_loss", "stage2_iters", "stage2_lr")
STAGE2_NETWORK_FIELDS = (
    "decision_hidden",
    "decision_kernel",
    "decision_features",
    "mixing",
    "blend_within",
    "output_balance",
)


def stage2_run(stage1: TrainConfig, requested: TrainConfig) -> TrainConfig:
    """Stage 1's run with the requested run's stage-2 settings."""
    return stage1.replace(
        **{name: getattr(requested, name) for name in STAGE2_RUN_FIELDS},
        **{name: getattr(requested.network, name) for name in STAGE2_NETWORK_FIELDS},
    )


def with_new_decision_maker(model, network: ModelConfig):
    """A stage-1 MEDOE rebuilt to `network` (which differs in STAGE2_NETWORK_FIELDS at most)."""
    if not model.config.is_medoe:
        raise ValueError("--stage 2 needs a MEDOE stage-1 checkpoint, got a single-decoder one")
    model.config = network
    model.decision = model.new_decision_maker(network).to(model.expert_lut.device)
    return model


class StageLoss(nn.Module):
    """One stage's training forward as a module, so DistributedDataParallel sees forward()."""

    def __init__(self, model, config: TrainConfig, stage: int, stats: ClassStats):
        super().__init__()
        self.model, self.config, self.stage = model, config, stage
        weights = inverse_sqrt_frequency_weights(stats.pixel_counts) if config.network.model == "reweight" else None
        if config.network.is_medoe and config.select_balance and config.stage2_loss == "selection":
            weights = selection_balance_weights(stats.pixel_counts, model.groups(), config.select_balance_power)
        if config.network.is_medoe and config.stage2_loss == "output" and config.expert_reweight:
            weights = inverse_sqrt_frequency_weights(stats.pixel_counts)  # the experts' own weighting, over all C
        self.register_buffer("weights", weights, persistent=False)
        adjustments = None
        if config.network.is_medoe and config.expert_balance > 0:
            adjustments = expert_log_priors(stats.pixel_counts, model.expert_sets(), config.expert_balance)
        self.register_buffer("adjustments", adjustments, persistent=False)
        expert_weights = None
        if config.network.is_medoe and config.expert_reweight:
            expert_weights = expert_reweights(stats.pixel_counts, model.expert_sets())
        self.register_buffer("expert_weights", expert_weights, persistent=False)
        # Each expert's weight of its auxiliary term (expert 1's is 0 without expert1_aux).
        self.alphas = (
            [config.alpha if k > 0 or config.expert1_aux else 0.0 for k in range(model.num_experts)]
            if config.network.is_medoe
            else []
        )

    def forward(self, images, labels) -> tuple[torch.Tensor, dict[str, float]]:
        model, config, size = self.model, self.config, labels.shape[-2:]
        if config.network.is_medoe and self.stage == 1:
            logits = [resize(z, size) for z in model.expert_logits(images)]
            total, parts = stage1_loss(
                logits,
                labels,
                model.expert_sets(),
                self.alphas,
                config.network.ignore_index,
                self.adjustments,
                self.expert_weights,
                kl_present_only=config.kl_support == "present",
            )
            return total, {f"expert{k + 1}": p.total.item() for k, p in enumerate(parts)}
        if config.network.is_medoe:
            with torch.no_grad():
                probs, features = model.expert_outputs(images)
            if config.stage2_loss == "output":  # bilinear to the label size, as inference resizes p_final
                mixed = resize(model.mixture(probs, features).probs, size)
                return mixture_nll(mixed, labels, self.weights, config.network.ignore_index), {}
            select = resize(model.selection_logits(probs, features), size)
            return selection_loss(select, labels, model.expert_lut, self.weights, config.network.ignore_index), {}
        logits = resize(model.logits(images), size)
        if config.network.model == "focal":
            return focal_loss(logits, labels, config.focal_gamma, config.network.ignore_index), {}
        if config.network.model == "reweight":
            return weighted_ce(logits, labels, self.weights, config.network.ignore_index), {}
        return F.cross_entropy(logits, labels, ignore_index=config.network.ignore_index), {}


WARMUP_START = 1e-6  # warm-up starts at lr * this (mmsegmentation's warmup_ratio, SegFormer's schedule)


def scheduled_lr(base_lr: float, it: int, iters: int, poly_power: float, warmup_iters: int) -> float:
    """Poly decay, times a linear warm-up over the first `warmup_iters` (mmseg's `linear` warm-up)."""
    lr = base_lr * (1 - it / iters) ** poly_power
    if it < warmup_iters:
        lr *= 1 - (1 - it / warmup_iters) * (1 - WARMUP_START)
    return lr


def parameter_groups(model, head_lr_mult: float) -> list[dict]:
    """The trainable parameters; with `head_lr_mult` != 1, two groups: the backbone at the base lr
    and everything else (context modules, experts, decision maker) at `head_lr_mult` times it.
    One group otherwise, so that checkpoints of runs without it resume unchanged."""
    params = [p for p in model.parameters() if p.requires_grad]
    if head_lr_mult == 1.0:
        return [{"params": params, "lr_mult": 1.0}]
    backbone = {id(p) for p in model.backbone.parameters()}
    return [
        {"params": [p for p in params if id(p) in backbone], "lr_mult": 1.0},
        {"params": [p for p in params if id(p) not in backbone], "lr_mult": head_lr_mult},
    ]


def train_stage(model, config, stage, stats, dataset, work_dir: Path, args, device, start_iter=0, state=None) -> bool:
    """Runs one stage from `start_iter`; returns False when --stop-after ended it early."""
    iters = config.iters if stage == 1 else config.stage2_steps
    base_lr = config.lr if stage == 1 else config.stage2_lr
    if config.network.is_medoe:
        model.set_stage(stage)
    params = parameter_groups(model, config.head_lr_mult if stage == 1 else 1.0)
    if config.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(params, lr=base_lr, momentum=config.momentum, weight_decay=config.weight_decay)
    warmup = config.warmup_iters if stage == 1 else 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    stage_loss = dist.wrap(StageLoss(model, config, stage, stats).to(device), device)
    batches = SeededBatches(
        len(dataset), config.batch_size, config.seed + 1000 * stage, iters, start_iter, dist.rank(), dist.world_size()
    )
    loader = make_loader(dataset, batches, config.num_workers, config.seed, config.crop_size)
    scaler = torch.amp.GradScaler("cuda", enabled=config.amp and device.type == "cuda")
    log = (work_dir / "log.jsonl").open("a") if dist.is_main() else None
    progress = tqdm(
        total=iters,
        initial=start_iter,
        desc=f"stage {stage}" if config.network.is_medoe else config.network.model,
        disable=not dist.is_main(),
        dynamic_ncols=True,
        mininterval=2.0 if sys.stdout.isatty() else 30.0,
        file=sys.stdout,
    )
    model.train()
    stopping = False
    tic = time.perf_counter()
    for it, (images, labels) in enumerate(loader, start=start_iter):
        lr = scheduled_lr(base_lr, it, iters, config.poly_power, warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=scaler.is_enabled()):
            loss, parts = stage_loss(images, labels)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        elapsed, tic = time.perf_counter() - tic, time.perf_counter()
        images_per_s = images.shape[0] * dist.world_size() / max(elapsed, 1e-9)
        progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
        progress.update(1)
        if log is not None:
            log.write(
                json.dumps(
                    {
                        "stage": stage,
                        "iter": it + 1,
                        "loss": loss.item(),
                        "lr": lr,
                        "images_per_s": images_per_s,
                        **parts,
                    }
                )
                + "\n"
            )
            log.flush()
        done = it + 1
        stopping = args.stop_after is not None and done - start_iter >= args.stop_after and done < iters
        if dist.is_main() and (done % args.save_every == 0 or done == iters or stopping):
            save_checkpoint(
                work_dir / "last",
                model,
                stats,
                run=config,
                train_state={
                    "stage": stage,
                    "iter": done,
                    "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                },
            )
        if stopping:
            break
    progress.close()
    if log is not None:
        log.close()
    return not stopping


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    device = dist.setup(args.device)
    work_dir = Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        train_set = get_dataset(config, "train")
        stats = compute_class_stats(train_set, work_dir, config.network.ignore_index)
        config = config.replace(
            num_classes=stats.num_classes, class_names=stats.class_names, palette=[list(c) for c in train_set.palette]
        )
        start_stage, start_iter, state, model = 1, 0, None, None
        if args.resume and (work_dir / "last").is_dir():
            checkpoint = load_checkpoint(work_dir / "last", device, train_state=True)
            model, state = checkpoint.model, checkpoint.train_state
            config = config.replace(network=model.config)  # the network as it was built
            start_stage, start_iter = state["stage"], state["iter"]
            print(f"resuming stage {start_stage} at iteration {start_iter} from {work_dir / 'last'}")
        elif args.stage == 2:
            stage1 = load_checkpoint(work_dir / "stage1", device)
            config = stage2_run(stage1.run, config)
            model = with_new_decision_maker(stage1.model, config.network)
            start_stage = 2
        if model is None:
            torch.manual_seed(config.seed)
            model = build_model(config.network, config.pretrained).to(device)
            if config.network.is_medoe:
                model.set_groups(stats.groups(config.network.group_thresholds))
        if config.network.output_balance > 0:
            model.set_class_prior(stats.pixel_counts)
        stages = ([1, 2] if args.stage is None else [args.stage]) if config.network.is_medoe else [1]
        holdout = config.stage2_holdout if config.network.is_medoe else 0.0
        stage_sets = dict(zip((1, 2), split_holdout(train_set, holdout, config.seed), strict=True))
        for stage in [s for s in stages if s >= start_stage]:
            resumed = stage == start_stage and state is not None
            iters_done = start_iter if resumed else 0
            total = config.iters if stage == 1 else config.stage2_steps
            if iters_done < total and not train_stage(
                model,
                config,
                stage,
                stats,
                stage_sets[stage],
                work_dir,
                args,
                device,
                iters_done,
                state if resumed else None,
            ):
                print(f"stopped after {args.stop_after} iterations; continue with --resume")
                dist.barrier()
                return 0
            if config.network.is_medoe and stage == 1 and dist.is_main():
                save_checkpoint(work_dir / "stage1", model, stats, run=config)
        if dist.is_main():
            save_checkpoint(work_dir / "final", model, stats, run=config)
            print(f"saved {work_dir / 'final'}")
            if args.eval:
                metrics = evaluate(model, get_dataset(config, "val"), device, config, stats)
                (work_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
                print(format_table({config.network.model: metrics}))
        dist.barrier()
    except (DatasetError, CheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
