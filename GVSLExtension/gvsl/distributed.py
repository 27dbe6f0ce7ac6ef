"""Distributed training helpers (``torchrun``: gloo on CPU, NCCL on CUDA): who we are, and the
collective decisions that keep every rank in step (an error or a stop on one rank ends all of
them together, never a rank waiting forever in an all-reduce).

Every function is a no-op wrapper when ``info.world_size == 1``. Functions marked *collective*
must be called by every rank in the same order.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from gvsl.device import select_device
from gvsl.training_config import TrainingError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    created_group: bool = False  # True: this process group is ours to destroy

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> tuple[DistInfo, torch.device]:
    """(DistInfo, device) from the torchrun environment (WORLD_SIZE, RANK, LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(), select_device(device_name)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        info.created_group = True
    return info, device


def _object_device(device: torch.device) -> Optional[torch.device]:
    return device if device.type == "cuda" else None  # NCCL moves pickled objects via the GPU


def _try(fn):
    try:
        return fn(), None
    except Exception as exc:  # re-raised on this rank, reported on the others
        return None, exc


def main_first(info: DistInfo, device: torch.device, fn: Callable[[], object]):
    """*Collective.* ``fn()`` on rank 0 first (e.g. preprocess and write a cache), then on the
    other ranks (which read the cache). An error on any rank is raised on every rank: the
    original exception where it happened, a collective :class:`TrainingError` elsewhere."""
    if not info.enabled:
        return fn()
    result, error = _try(fn) if info.is_main else (None, None)
    box = [None if error is None else str(error)]
    dist.broadcast_object_list(box, src=0, device=_object_device(device))
    if box[0] is not None:
        if error is not None:
            raise error
        raise TrainingError(f"rank 0 failed: {box[0]}", collective=True)
    if not info.is_main:
        result, error = _try(fn)
    errors: List[Optional[str]] = [None] * info.world_size
    dist.all_gather_object(errors, None if error is None else str(error))
    if error is not None:
        raise error
    for rank, message in enumerate(errors):
        if message is not None:
            raise TrainingError(f"rank {rank} failed: {message}", collective=True)
    return result


def on_rank0_shared(info: DistInfo, device: torch.device, fn: Callable[[], object]):
    """*Collective.* ``fn()`` on rank 0 only; its (picklable) result is returned on every rank."""
    if not info.enabled:
        return fn()
    result, error = _try(fn) if info.is_main else (None, None)
    box = [{"result": result} if error is None else {"error": str(error)}]
    dist.broadcast_object_list(box, src=0, device=_object_device(device))
    if error is not None:
        raise error
    if "error" in box[0]:
        raise TrainingError(f"rank 0 failed: {box[0]['error']}", collective=True)
    return box[0]["result"]


def any_rank(info: DistInfo, device: torch.device, flag: bool) -> bool:
    """*Collective.* True on every rank when ``flag`` is True on at least one."""
    value = torch.tensor([1.0 if flag else 0.0])
    if info.enabled:
        value = value.to(device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def per_rank(info: DistInfo, device: torch.device, value: float) -> List[float]:
    """*Collective.* Every rank's ``value`` (NaN and Inf survive), in rank order, on every rank."""
    values = torch.zeros(info.world_size, dtype=torch.float64, device=device)
    values[info.rank] = float(value)
    if info.enabled:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values.tolist()


def mean_over_ranks(info: DistInfo, device: torch.device, terms: Dict[str, float]) -> Dict[str, float]:
    """*Collective.* The mean of each float of ``terms`` over all ranks (what the step optimised)."""
    if not info.enabled:
        return terms
    names = list(terms)
    values = torch.tensor([terms[k] for k in names], dtype=torch.float64, device=device)
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return {k: float(v) / info.world_size for k, v in zip(names, values.tolist())}


def gather_objects(info: DistInfo, obj) -> list:
    """*Collective.* Every rank's ``obj`` in rank order (``[obj]`` without DDP)."""
    if not info.enabled:
        return [obj]
    gathered = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
