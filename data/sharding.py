"""The one sample order of every loader: a seeded per-epoch permutation shared by all ranks, split
rank::world.

The FFCV loaders (loaders.py) and the torchvision fallback (fallback.py) both take their order from
:func:`shard_indices`, so the same seed, epoch, rank and world size give the same samples in the same
order whichever loader reads them. Validation shards cover each sample exactly once; training shards
are cut to equal length (``equal=True``: DDP ranks must take the same number of steps), dropping at
most world - 1 samples an epoch, different ones each epoch.
"""
from __future__ import annotations

import numpy as np
import torch


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the initialized torch.distributed group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def shard_indices(indices_or_n, *, epoch: int, shuffle: bool, seed: int, rank: int, world: int,
                  equal: bool) -> np.ndarray:
    """The samples rank `rank` of `world` reads in epoch `epoch`, in order.

    indices_or_n: an int n (the samples 0..n-1) or a 1-D sequence of sample indices.
    shuffle: permute with numpy's generator seeded by (seed, epoch), the same on every rank;
    otherwise keep the given order. equal: first cut the order to a multiple of `world`, so that every
    rank gets the same count. Returns a 1-D int64 array: every world-th entry from position `rank`.
    Raises ValueError for a negative seed or epoch (numpy seeds must be non-negative) or a rank
    outside [0, world).
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world={world}), got {rank}")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got seed={seed}, epoch={epoch}")
    if isinstance(indices_or_n, (int, np.integer)):
        idx = np.arange(int(indices_or_n), dtype=np.int64)
    else:
        idx = np.asarray(indices_or_n, dtype=np.int64).reshape(-1)
    if shuffle:
        idx = np.random.default_rng((seed, epoch)).permutation(idx)
    if equal:
        idx = idx[: len(idx) // world * world]
    return idx[rank::world]
