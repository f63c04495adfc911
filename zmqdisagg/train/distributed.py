"""Data parallelism for the draft: ``torchrun`` ranks, DDP gradients that are *summed*, not averaged.

Each rank loss-normalises by the global batch's token count (``eagle3_loss``), so the gradient of the
global loss is the **sum** of the ranks' gradients. DDP's default hook divides by the world size; ours
all-reduces with SUM instead. With two ranks the sum ``g0 + g1`` is one float addition per element, the
same one a single process does when it accumulates the same two micro-batches (``micro_batches = 2``):
that is why 2 ranks x 1 micro-batch reproduce 1 rank x 2 micro-batches bit for bit.

Guarantees: without ``WORLD_SIZE`` (or with 1) nothing distributed is initialised and every helper is a
no-op; the backend is gloo on CPU and NCCL on CUDA; ``close()`` destroys only a group this module made.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the ``torchrun`` process group described by the environment, if there is one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return DistInfo(rank=rank, world_size=world, local_rank=local)
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend)
    logger.info("joined %s process group: rank %d of %d", backend, rank, world)
    return DistInfo(rank=rank, world_size=world, local_rank=local, owns_group=True)


def _sum_hook(_state, bucket):  # unannotated: DDP rejects the string annotations of `from __future__`
    """DDP comm hook: all-reduce the bucket with SUM (the default hook averages)."""
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def wrap(module: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    """DDP with a summing all-reduce; buffers (frozen embedding, vocab maps) are never broadcast."""
    if info.world_size == 1:
        return module
    device_ids = [info.local_rank] if next(module.parameters()).is_cuda else None
    ddp = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def broadcast_object(obj: object, info: DistInfo) -> object:
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def close(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
