"""Data pipelines for crate-fast (installed as ``crate_fast.data``).

- :func:`train_loader`, :func:`val_loader`: FFCV loaders, normalization on the device.
- ``python -m crate_fast.data.write_ffcv SRC OUT.beton``: ImageFolder -> .beton (atomic, skips and
  lists what cannot be stored, never hangs, records the class names next to OUT).
- :func:`build_loaders`: what train.py's ``--data`` accepts (digits, synthetic, folders, .beton dirs,
  CIFAR-10/100, Flowers-102, Oxford-IIIT Pets), with FFCV or the torchvision fallback; under
  torch.distributed it converts and downloads once per node (prepare.py).
- :func:`scan_image_folder` (folders.py): what an ImageFolder tree holds, the one list both loaders read.
- :func:`beton_classes` (records.py): the class names recorded with a .beton.
- :func:`shard_indices` (sharding.py): the one sample order both loaders read.
- :func:`load_rgb`, :func:`to_rgb_array`, :class:`Images` (datasets.py): the one image decoder and
  data set adapter.
- :class:`RandAugment` (augment.py): a training loader's ``batch_transform`` on uint8 batches.
- ``IMAGENET_DEFAULT_MEAN`` / ``IMAGENET_DEFAULT_STD`` (0-1, timm's names) and ``IMAGENET_MEAN`` /
  ``IMAGENET_STD`` (the same times 255, for uint8 pixels): the one home of ImageNet's statistics;
  ``DEFAULT_CROP_PCT``: the evaluation center crop (224/256).
FFCV itself is imported only when an FFCV loader or writer is used. Messages go through ``logging``
(loggers under ``crate_fast.data``); only the write_ffcv command line prints.
"""
from .augment import RandAugment
from .datasets import Images, load_rgb, to_rgb_array
from .folders import scan_image_folder
from .loaders import (
    DEFAULT_CROP_PCT,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    check_beton,
    train_loader,
    val_loader,
)
from .records import beton_classes
from .sharding import shard_indices
from .sources import LoaderOptions, build_loaders

__all__ = ["DEFAULT_CROP_PCT", "IMAGENET_DEFAULT_MEAN", "IMAGENET_DEFAULT_STD", "IMAGENET_MEAN", "IMAGENET_STD",
           "Images", "LoaderOptions", "RandAugment", "beton_classes", "build_loaders", "check_beton", "load_rgb",
           "scan_image_folder", "shard_indices", "to_rgb_array", "train_loader", "val_loader"]
