"""The process group of a run and the few collectives the loop needs. Every function works without a
process group too (one process: the identity)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: global rank and world size, local rank and local world (the ranks on
    this node, as torchrun sets LOCAL_RANK / LOCAL_WORLD_SIZE), and its device."""

    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str, init_method: str = "env://") -> Ranks:
    """Join the process group torchrun describes (gloo on CPUs, NCCL on GPUs; none for one process) and
    pick this rank's device: cuda:LOCAL_RANK for device "cuda"."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.startswith("cuda"):
        dev = torch.device("cuda", local if device == "cuda" else torch.device(device).index)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", init_method=init_method)
    return Ranks(rank, world, local, local_world, dev)


def all_sum(values: list[float], device) -> list[float]:
    """Each value summed over the ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def all_gather_object(obj) -> list:
    """[every rank's obj] in rank order (pickled through the process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_rows(array: np.ndarray) -> np.ndarray:
    """Every rank's array concatenated along axis 0, in rank order (the array itself without a group)."""
    return np.concatenate(all_gather_object(array), axis=0)


def broadcast_object(obj, src: int = 0):
    """Rank src's obj, on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def where() -> str:
    """This process, for messages: "rank R on HOST"."""
    return f"rank {dist.get_rank() if dist.is_initialized() else 0} on {socket.gethostname()}"


def check_agree(what: str, value) -> None:
    """Stop every rank at once, with one message naming the ranks and hosts that differ, unless every rank
    holds the same `value` (anything picklable and comparable). Raises SystemExit on every rank."""
    seen = all_gather_object((value, where()))
    if any(v != seen[0][0] for v, _ in seen):
        groups = {}
        for v, who in seen:
            groups.setdefault(repr(v), []).append(who)
        detail = "; ".join(f"{', '.join(who)}: {v}" for v, who in groups.items())
        raise SystemExit(f"error: the ranks disagree on {what} ({detail})")
