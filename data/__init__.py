"""Data pipelines for crate-fast (installed as ``crate_fast.data``).

- :func:`train_loader`, :func:`val_loader`: FFCV loaders, normalization on the device.
- ``python -m crate_fast.data.write_ffcv SRC OUT.beton``: ImageFolder -> .beton (atomic, skips bad files).
- :func:`build_loaders`: what train.py's ``--data`` accepts (digits, synthetic, folders, .beton dirs,
  CIFAR-10/100, Flowers-102, Oxford-IIIT Pets), with FFCV or the torchvision fallback.
FFCV itself is imported only when an FFCV loader or writer is used.
"""
from .loaders import IMAGENET_MEAN, IMAGENET_STD, check_beton, train_loader, val_loader
from .sources import LoaderOptions, build_loaders

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LoaderOptions", "build_loaders", "check_beton", "train_loader",
           "val_loader"]
