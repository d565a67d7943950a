"""Process-group helpers. Single process (no torch.distributed group) is world size 1 and every call is a no-op.

Under `accelerate launch` / `torchrun`, ranks share work by index and only the main process writes files.
"""

from __future__ import annotations

import os


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def init_from_env() -> None:
    """Join the process group when launched by accelerate/torchrun (gloo on CPU, nccl on GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _dist() is not None:
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true") else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def gather_objects(obj):
    """All ranks get the list of every rank's `obj`, in rank order."""
    d = _dist()
    if not d:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's `obj` on every rank."""
    d = _dist()
    if not d:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_mean(tensor):
    """Mean of a tensor over ranks (in place on a copy)."""
    d = _dist()
    if not d:
        return tensor
    t = tensor.clone()
    d.all_reduce(t)
    return t / d.get_world_size()


def all_reduce_sum(tensor):
    d = _dist()
    if not d:
        return tensor
    t = tensor.clone()
    d.all_reduce(t)
    return t
