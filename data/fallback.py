"""Loaders that need no FFCV: torchvision's ImageFolder/DataLoader path and synthetic batches.

The torchvision path applies the same transforms as the FFCV pipelines (RandomResizedCrop + flip for
training, center crop 224/256 for evaluation) and normalizes on the device; it is the fallback for
users without FFCV, and the baseline bench_data.py compares FFCV against.
"""
from __future__ import annotations

import math

import torch

from .loaders import DEFAULT_CROP_RATIO, IMAGENET_MEAN, IMAGENET_STD, NormalizingLoader, _rank_world


class _ShardSampler(torch.utils.data.Sampler):
    """Seeded per-epoch order shared by all ranks, split rank::world (like the FFCV loaders)."""

    def __init__(self, n: int, shuffle: bool, seed: int, distributed: bool, equal: bool):
        self.n, self.shuffle, self.seed, self.distributed, self.equal = n, shuffle, seed, distributed, equal
        self.epoch = 0

    def _indices(self):
        rank, world = _rank_world() if self.distributed else (0, 1)
        if self.shuffle:
            idx = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch))
        else:
            idx = torch.arange(self.n)
        if self.equal:
            idx = idx[: self.n // world * world]
        return idx[rank::world].tolist()

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


class TorchvisionLoader(NormalizingLoader):
    """DataLoader over a dataset of (PIL image, label), uint8 to the device, normalized there."""

    def __init__(self, dataset, *, batch_size, train, num_workers, device, dtype, distributed, seed,
                 drop_last, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.sampler = _ShardSampler(len(dataset), shuffle=train, seed=seed, distributed=distributed, equal=train)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=num_workers, drop_last=drop_last,
            pin_memory=torch.device(device).type == "cuda", persistent_workers=num_workers > 0)
        super().__init__(loader, device, dtype, mean, std)

    @property
    def num_samples(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch


def train_transform(img_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip: bool = True):
    from torchvision.transforms import v2

    ops = [v2.RandomResizedCrop(img_size, scale=tuple(scale), ratio=tuple(ratio), antialias=True)]
    ops += [v2.RandomHorizontalFlip()] if flip else []
    return v2.Compose(ops + [v2.PILToTensor()])


def val_transform(img_size: int, crop_ratio: float = DEFAULT_CROP_RATIO):
    from torchvision.transforms import v2

    return v2.Compose([v2.Resize(int(math.floor(img_size / crop_ratio)), antialias=True), v2.CenterCrop(img_size),
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
