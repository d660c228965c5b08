"""Batch augmentations on uint8 pixels, for a training loader's `batch_transform` (run on the device,
before normalization: see loaders.NormalizingLoader).

    train = train_loader(path, batch_size=256, device="cuda", batch_transform=RandAugment(2, 14))
"""
from __future__ import annotations

import torch


class RandAugment:
    """torchvision's v2.RandAugment(num_ops, magnitude), drawn per image as the official CRATE
    finetune.py does: uint8 (B, 3, H, W) -> uint8 (B, 3, H, W) on the same device, channels_last kept
    when the input is. Draws from torch's global RNG. Raises ValueError for another dtype or rank."""

    def __init__(self, num_ops: int = 2, magnitude: int = 14):
        from torchvision.transforms import v2

        self.num_ops, self.magnitude = num_ops, magnitude
        self.op = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)

    def __repr__(self) -> str:
        return f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude})"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"RandAugment takes uint8 (B, 3, H, W) batches, got {images.dtype} "
                             f"{tuple(images.shape)}")
        out = torch.stack([self.op(image) for image in images])
        if images.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)
        return out
