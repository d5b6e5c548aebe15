"""torchrun support: one process per GPU, DDP with SyncBatchNorm; single-process otherwise."""

from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist
from torch import nn


def setup(device: str) -> torch.device:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    if not torch_dist.is_initialized():
        return module
    if device.type == "cuda":
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def barrier() -> None:
    # Ranks other than 0 finish before rank 0 has written checkpoints and evaluated; tearing
    # down gloo while a peer still holds the group can abort that peer, so all wait first.
    if torch_dist.is_initialized():
        torch_dist.barrier()


def cleanup() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
