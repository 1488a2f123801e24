"""The few ``torch.distributed`` collectives training and validation use, in one place.

Each one is a no-op (it returns its own rank's value) when no process group is initialized, so
the code that calls them runs and is tested unchanged in a single process.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def initialized() -> bool:
    """True inside an initialized process group (a Ray Train worker group, a DDP test)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: list[float], device: Any) -> list[float]:
    """Element-wise sums over all ranks (float64 on ``device``: NCCL reduces CUDA tensors only)."""
    if not initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_have(has: bool, world: int, device: Any) -> bool:
    """True when every rank ``has`` (one MIN all-reduce; no collective on a single rank)."""
    if world == 1 or not initialized():
        return has
    t = torch.tensor([1.0 if has else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: Any) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics drift apart between DDP's
    per-forward broadcasts): validation then scores exactly the weights a checkpoint holds."""
    if initialized():
        for buf in model.buffers():
            dist.broadcast(buf, src=0)


__all__ = ["all_gather", "all_have", "all_reduce_sum", "broadcast_buffers", "initialized"]
