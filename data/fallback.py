"""Loaders that need no FFCV: torchvision's DataLoader path and synthetic batches.

The torchvision path applies the same transforms as the FFCV pipelines (RandomResizedCrop with timm's
`scale` and `ratio` + flip for training, center crop of `crop_pct` for evaluation), reads the same
sample order (sharding.shard_indices: the same seed gives the same order as the FFCV loaders) and
normalizes on the device; it is the fallback for users without FFCV, and the baseline bench_data.py
compares FFCV against.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import sharding
from .loaders import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, NormalizingLoader


class ShardSampler(torch.utils.data.Sampler):
    """The torchvision loader's sample order: sharding.shard_indices(n, ...) of this rank, the FFCV
    loaders' order. Like FFCV's loader, each pass starts the next epoch unless set_epoch says which."""

    def __init__(self, n: int, *, shuffle: bool, seed: int, distributed: bool, equal: bool):
        self.n, self.shuffle, self.seed, self.distributed, self.equal = n, shuffle, seed, distributed, equal
        self.epoch = 0

    def _indices(self, epoch: int, shuffle: bool):
        rank, world = sharding.rank_world() if self.distributed else (0, 1)
        return sharding.shard_indices(self.n, epoch=epoch, shuffle=shuffle, seed=self.seed, rank=rank, world=world,
                                      equal=self.equal)

    def __iter__(self):
        order = self._indices(self.epoch, self.shuffle)
        self.epoch += 1
        return iter(order.tolist())

    def __len__(self) -> int:
        return len(self._indices(0, shuffle=False))       # the count does not depend on the order


class TorchvisionLoader(NormalizingLoader):
    """DataLoader over a data set of (uint8 (3, H, W) tensor, label) pairs (e.g. datasets.Images with a
    train_transform / val_transform), uint8 to the device, batch_transform there (training only),
    normalized there: (B, 3, H, W) in `dtype`, channels_last, int64 labels (B,).
    Raises ValueError for a batch_transform on an evaluation loader (train=False)."""

    def __init__(self, dataset, *, batch_size, train, num_workers, device, dtype, distributed, seed,
                 drop_last, mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_transform: Callable | None = None):
        if batch_transform is not None and not train:
            raise ValueError("batch_transform is for training loaders; evaluation reads the images as they are")
        self.sampler = ShardSampler(len(dataset), shuffle=train, seed=seed, distributed=distributed, equal=train)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers, drop_last=drop_last,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=num_workers > 0)
        super().__init__(loader, device, dtype, mean, std, batch_transform)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch `epoch`'s order (exact resume)."""
        self.sampler.epoch = epoch


def train_transform(img_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
    """PIL image -> uint8 (3, img_size, img_size) tensor: RandomResizedCrop(img_size, scale, ratio)
    (timm's names: area fraction range, aspect ratio range), then a random horizontal flip."""
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(img_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    ops += [v2.RandomHorizontalFlip()] if flip else []
    return v2.Compose(ops + [v2.PILToTensor()])


def val_transform(img_size: int, crop_pct: float = DEFAULT_CROP_PCT):
    """PIL image -> uint8 (3, img_size, img_size) tensor: the short side resized to
    floor(img_size / crop_pct), then the center img_size crop (timm's eval transform).
    Raises ValueError for crop_pct outside (0, 1]."""
    from torchvision.transforms import v2

    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return v2.Compose([v2.Resize(int(math.floor(img_size / crop_pct)), antialias=True), v2.CenterCrop(img_size),
                       v2.PILToTensor()])


class SyntheticLoader:
    """Random batches made once on the device and served `steps` times: measures the model, not I/O."""

    def __init__(self, *, batch_size, img_size, num_classes, steps, device, dtype, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.images = torch.randn(batch_size, 3, img_size, img_size, generator=g).to(device, dtype)
        self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    @property
    def num_samples(self) -> int:
        return self.steps * len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.labels
