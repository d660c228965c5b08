"""Data pipelines for crate-fast (installed as ``crate_fast.data``).

- :func:`train_loader`, :func:`val_loader`: FFCV loaders, normalization on the device.
- ``python -m crate_fast.data.write_ffcv SRC OUT.beton``: ImageFolder -> .beton (atomic, skips and
  lists what cannot be stored, never hangs).
- :func:`build_loaders`: what train.py's ``--data`` accepts (digits, synthetic, folders, .beton dirs,
  CIFAR-10/100, Flowers-102, Oxford-IIIT Pets), with FFCV or the torchvision fallback.
- :func:`shard_indices` (sharding.py): the one sample order both loaders read.
- :func:`load_rgb`, :func:`to_rgb_array`, :class:`Images` (datasets.py): the one image decoder and
  data set adapter.
- :class:`RandAugment` (augment.py): a training loader's ``batch_transform`` on uint8 batches.
FFCV itself is imported only when an FFCV loader or writer is used.
"""
from .augment import RandAugment
from .datasets import Images, load_rgb, to_rgb_array
from .loaders import DEFAULT_CROP_PCT, IMAGENET_MEAN, IMAGENET_STD, check_beton, train_loader, val_loader
from .sharding import shard_indices
from .sources import LoaderOptions, build_loaders

__all__ = ["DEFAULT_CROP_PCT", "IMAGENET_MEAN", "IMAGENET_STD", "Images", "LoaderOptions", "RandAugment",
           "build_loaders", "check_beton", "load_rgb", "shard_indices", "to_rgb_array", "train_loader",
           "val_loader"]
