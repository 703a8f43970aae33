"""The process group of a ``torchrun`` launch: who we are, which device is ours, and rank-0-only work.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``python -m`` launch is a
world of one and never touches ``torch.distributed``. GPUs use NCCL, CPU processes use gloo (the
tests train with several gloo processes on one machine).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

# rank 0 alone runs the alignment phase and the dev evaluations while the others wait
BARRIER_TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a decision all ranks must share)."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item()

    def share(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch (length-sorted, so shares pad alike)."""
        size, rest = divmod(len(batch), self.size)
        start = self.rank * size + min(self.rank, rest)
        return batch[start : start + size + (1 if self.rank < rest else 0)]

    def wrap(self, model: torch.nn.Module, find_unused_parameters: bool = False) -> torch.nn.Module:
        """``model`` in DistributedDataParallel when there are several processes, else itself.

        Frozen weights and buffers are loaded identically everywhere: only the trainable weights sync.
        ``find_unused_parameters``: some steps leave trainable weights without a gradient (the adapter,
        while the LLM reads transcripts)."""
        if not self.distributed:
            return model
        fixed = [n for n, p in model.named_parameters() if not p.requires_grad]
        fixed += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, fixed)
        return DistributedDataParallel(model, device_ids=None, find_unused_parameters=find_unused_parameters)


def init_world(use_gpu: bool | None = None) -> World:
    """Join the ``torchrun`` process group, if any, and pick this process's device.

    ``use_gpu`` None means: a GPU when one is visible.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if use_gpu is None:
        use_gpu = torch.cuda.is_available()
    if use_gpu and not torch.cuda.is_available():
        raise RuntimeError("a GPU was asked for (--ngpu > 0) but torch sees none")
    device = torch.device("cuda", local_rank) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_gpu else "gloo", timeout=BARRIER_TIMEOUT)
        log.info("rank %d of %d (local rank %d) on %s", rank, size, local_rank, device)
    return World(rank, size, local_rank, device)


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
