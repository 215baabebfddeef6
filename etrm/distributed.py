"""torch.distributed glue for training and evaluation: NCCL on GPU, gloo on CPU, from torchrun's environment.

Every rank holds the same weights and optimizer state (gradients are summed before the
step), so rank 0 alone writes files; per-rank state (ACT carry, sampler, RNG) is gathered
to rank 0 for checkpoints and scattered back on resume.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from etrm.errors import EtrmError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """One process (no torchrun) or a process group from RANK/WORLD_SIZE/LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world_size == 1:
        return DistContext(0, 1, torch.device("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # The default timeout: every rank takes a share of each evaluation, so none waits long.
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return DistContext(dist.get_rank(), world_size, torch.device(f"cuda:{local_rank}" if cuda else "cpu"))


def shutdown(ctx: DistContext) -> None:
    if ctx.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum_(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    """Sum tensors over ranks in place, as one flat message."""
    if ctx.world_size == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_grads_(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum gradients over ranks. A parameter with a gradient on some rank gets one everywhere (zero where
    it had none); one without a gradient on every rank keeps None, as in a single process."""
    if ctx.world_size == 1:
        return
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=ctx.device)
    dist.all_reduce(has_grad)
    with_grad = [p for p, flag in zip(params, has_grad.tolist(), strict=True) if flag > 0]
    for p in with_grad:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum_([p.grad for p in with_grad], ctx)


def broadcast_parameters_(module: torch.nn.Module, ctx: DistContext) -> None:
    """Start every rank from rank 0's weights and buffers."""
    if ctx.world_size == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def gather_to_main(obj, ctx: DistContext) -> list | None:
    """Every rank's `obj` on rank 0 (in rank order), None elsewhere."""
    if ctx.world_size == 1:
        return [obj]
    out = [None] * ctx.world_size if ctx.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_main(obj, ctx: DistContext):
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def launch_torchrun(nproc: int, etrm_args: list[str]) -> int:
    """Re-run `etrm <args>` under torchrun with `nproc` processes on this machine."""
    if nproc < 1:
        raise EtrmError(f"--nproc must be at least 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "etrm", *etrm_args]
    return subprocess.call(cmd)
