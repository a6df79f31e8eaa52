"""Device and process-group set-up for ``torchrun``: NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from monai.handlers import CheckpointSaver

__all__ = ["ddp_device", "init_process_group", "is_rank0", "rank_handlers"]


def ddp_device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when GPUs exist, else CPU."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return torch.device("cpu")


def init_process_group() -> bool:
    """Join the ``torchrun`` process group once (NCCL with CUDA, gloo otherwise) and pin this rank's GPU."""
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(ddp_device())
    return True


def is_rank0() -> bool:
    """True outside distributed runs and on rank 0."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank_handlers(handlers: Sequence[Any]) -> list[Any]:
    """The trainer handlers of this rank: all of them on rank 0; other ranks leave out the checkpoint savers (rank 0
    writes the shared files) and keep the rest (e.g. each rank's own run state for resuming)."""
    return [h for h in handlers if is_rank0() or not isinstance(h, CheckpointSaver)]
