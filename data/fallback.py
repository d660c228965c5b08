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
        self.dataset, self.train, self.resolution = dataset, train, None
        self.sampler = ShardSampler(len(dataset), shuffle=train, seed=seed, distributed=distributed, equal=train)
        self._loader_args = dict(batch_size=batch_size, sampler=self.sampler, num_workers=num_workers,
                                 drop_last=drop_last, pin_memory=torch.device(device).type == "cuda",
                                 persistent_workers=num_workers > 0)
        super().__init__(torch.utils.data.DataLoader(dataset, **self._loader_args), device, dtype, mean, std,
                         batch_transform)

    def set_resolution(self, res: int) -> None:
        """Training crop size (res x res) from the next pass on (progressive resizing), as the FFCV
        loader's: the size of the RandomResizedCrop in the data set's transform (train_transform).
        Raises RuntimeError on an evaluation loader or one whose data set's transform has no
        RandomResizedCrop; ValueError for res < 1."""
        if not self.train:
            raise RuntimeError("set_resolution is only available on training loaders")
        if not _random_resized_crops(getattr(self.dataset, "transform", None)):
            raise RuntimeError("set_resolution needs a data set whose transform has a RandomResizedCrop "
                               "(fallback.train_transform)")
        if res < 1:
            raise ValueError(f"resolution must be positive, got {res}")
        self.resolution = res             # applied when the next pass starts (_start_pass)

    def _start_pass(self):
        crops = _random_resized_crops(getattr(self.dataset, "transform", None))
        size = None if self.resolution is None else (self.resolution, self.resolution)
        if size is not None and any(tuple(c.size) != size for c in crops):
            for crop in crops:
                crop.size = size          # a tuple, as v2.RandomResizedCrop keeps it
            if self._loader_args["persistent_workers"]:
                # Workers that persist hold a copy of the data set made when they started: new workers
                # (a new DataLoader) see the new size. The old ones stop when their loader is collected.
                self.loader = torch.utils.data.DataLoader(self.dataset, **self._loader_args)
        return iter(self.loader)

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch `epoch`'s order (exact resume)."""
        self.sampler.epoch = epoch


def _random_resized_crops(transform) -> list:
    """The RandomResizedCrop steps of a torchvision v2 transform (itself, or the steps of a Compose)."""
    from torchvision.transforms import v2

    steps = getattr(transform, "transforms", [transform])
    return [t for t in steps if isinstance(t, v2.RandomResizedCrop)]


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
    """Random batches made once on the device and served `steps` times: measures the model, not I/O.
    Images (batch_size, 3, img_size, img_size) in `dtype`, channels_last; int64 labels (batch_size,)."""

    def __init__(self, *, batch_size, img_size, num_classes, steps, device, dtype, seed=0):
        self.batch_size, self.device, self.dtype, self.seed = batch_size, device, dtype, seed
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.images = self._images(img_size, g)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=g).to(device)
        self.steps = steps

    def _images(self, img_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images drawn first from a generator seeded with `seed` (the same draws at every size)."""
        g = generator or torch.Generator(device="cpu").manual_seed(self.seed)
        images = torch.randn(self.batch_size, 3, img_size, img_size, generator=g).to(self.device, self.dtype)
        return images.contiguous(memory_format=torch.channels_last)

    def set_resolution(self, res: int) -> None:
        """Image size (res x res) from the next pass on (progressive resizing), as the FFCV loader's.
        Raises ValueError for res < 1."""
        if res < 1:
            raise ValueError(f"resolution must be positive, got {res}")
        if self.images.shape[-1] != res:
            self.images = self._images(res)

    def __len__(self) -> int:
        return self.steps

    @property
    def num_samples(self) -> int:
        return self.steps * len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        images, labels = self.images, self.labels         # a pass keeps its size (set_resolution)
        for _ in range(self.steps):
            yield images, labels
