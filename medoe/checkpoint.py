"""Checkpoint directories: `model.safetensors` + `config.json` + `class_stats.json`.

A directory is written whole into a temporary sibling and swapped into place in one step
(renameat2 RENAME_EXCHANGE; two renames where the OS or filesystem lacks it), so a reader (or
a crash mid-save) sees either the previous checkpoint or the new one, never a mix.
Weights are safetensors and the optional training state is read with `weights_only=True`:
loading a checkpoint never runs code from it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medoe.class_stats import ClassStats
from medoe.config import ModelConfig, TrainConfig
from medoe.model import SegmentationModel, build_model

WEIGHTS, CONFIG, CLASS_STATS, TRAIN_STATE = "model.safetensors", "config.json", "class_stats.json", "train_state.pt"


class CheckpointError(ValueError):
    pass


class Checkpoint(NamedTuple):
    model: SegmentationModel
    config: ModelConfig  # the network's config (model.config): all that export and serving need
    run: TrainConfig  # the training run it came from (defaults where the checkpoint holds none)
    class_stats: ClassStats | None
    train_state: dict[str, Any] | None


def save_checkpoint(
    directory: str | Path,
    model: SegmentationModel,
    class_stats: ClassStats | None = None,
    train_state: dict[str, Any] | None = None,
    run: TrainConfig | None = None,
) -> Path:
    """`run` (whose network must be the model's) goes into config.json beside the network;
    without it config.json holds the network's fields alone."""
    if run is not None and run.network != model.config:
        raise ValueError("save_checkpoint: run.network differs from the model's config")
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    # A run killed mid-save leaves its hidden staging folder behind; one writer per checkpoint
    # (rank 0), so any such folder is stale by now and would only pile up across preemptions.
    for stale in directory.parent.glob(f".{directory.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(staging / WEIGHTS), metadata={"format": "medoe"})
        (run or TrainConfig(network=model.config)).save(staging / CONFIG)
        if class_stats is not None:
            class_stats.save(staging / CLASS_STATS)
        if train_state is not None:
            torch.save(train_state, staging / TRAIN_STATE)
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _swap_into_place(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def _exchange(a: Path, b: Path) -> bool:
    """Swaps two existing paths in one step (Linux renameat2 RENAME_EXCHANGE); False where the
    platform or the filesystem cannot (the caller falls back to two renames)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _swap_into_place(staging: Path, directory: Path) -> None:
    if not directory.exists():
        os.replace(staging, directory)
        return
    # Two renames (old out, new in) would leave no `directory` at all for a process killed
    # between them, and `--resume` would then start over; the exchange has no such moment.
    if _exchange(staging, directory):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous checkpoint
        return
    retired = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
    os.replace(directory, retired / directory.name)
    try:
        os.replace(staging, directory)
    except BaseException:
        os.replace(retired / directory.name, directory)  # put the previous checkpoint back
        shutil.rmtree(retired, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu", train_state: bool = False) -> Checkpoint:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory} is not a checkpoint: {name} is missing")
    try:
        run = TrainConfig.load(directory / CONFIG)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{directory / CONFIG}: {err}") from None
    try:
        weights = load_file(str(directory / WEIGHTS), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{directory / WEIGHTS} is not a readable safetensors file: {err}") from None
    model = build_model(run.network).to(device)  # no ImageNet file: the checkpoint's weights replace it
    try:
        result = model.load_state_dict(weights, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(
            f"{directory / WEIGHTS} does not match its config.json: {str(err).splitlines()[-1].strip()}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{directory / WEIGHTS} does not match its config.json: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    stats = None
    if (directory / CLASS_STATS).is_file():
        try:
            stats = ClassStats.load(directory / CLASS_STATS)
        except (ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{directory / CLASS_STATS}: {err}") from None
    state = None
    if train_state and (directory / TRAIN_STATE).is_file():
        try:
            state = torch.load(directory / TRAIN_STATE, map_location="cpu", weights_only=True)
        except Exception as err:  # an unpickling refusal or a torn file: both mean "not usable"
            raise CheckpointError(f"{directory / TRAIN_STATE} refused: {str(err).splitlines()[0]}") from None
    model.eval()
    return Checkpoint(model, run.network, run, stats, state)
