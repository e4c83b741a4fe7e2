"""torch.distributed glue for fine-tuning under torchrun (DDP, index sharding, reductions).

Single-process runs use the same code path with ``world_size == 1`` and no process group, so
what is tested with gloo on 2 CPU processes is what runs with nccl on a GPU cluster.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DistContext:
    """Where this process sits: rank, world size and the torch device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: str) -> DistContext:
    """Join the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    dev = torch.device(device)
    if env_world_size() <= 1:
        return DistContext(device=dev)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, owns)


def teardown(ctx: DistContext) -> None:
    if ctx.enabled and ctx.owns_group:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def shard(indices: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """DistributedSampler's split: pad by wrapping to a multiple of world_size, then stride."""
    if not ctx.enabled:
        return indices
    total = -(-len(indices) // ctx.world_size) * ctx.world_size
    padded = torch.cat([indices, indices[: total - len(indices)]])
    return padded[ctx.rank :: ctx.world_size]


def all_sum(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.enabled:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def average_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Average float buffers (BN running stats) so every rank holds the same model."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    for buf in unwrap(model).buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(ctx.world_size)


def gather_objects(obj, ctx: DistContext) -> list:
    if not ctx.enabled:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()
