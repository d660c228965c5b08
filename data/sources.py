"""What train.py's --data accepts, turned into (train, val) loaders.

- ``digits``: the embedded default (scikit-learn's 8x8 digits), written to .beton on first use;
- ``synthetic``: random tensors on the device, for benchmarks;
- a directory holding ``train.beton`` and ``val.beton``;
- a directory holding ``train/`` and ``val/`` ImageFolders (converted to .beton in the cache on first
  use, reused afterwards; corrupt images are skipped and listed);
- ``cifar10``, ``cifar100``, ``flowers102``, ``pets``: torchvision's data sets, downloaded into
  --data-root, or read from there when already on disk.

loader="ffcv" (default) or "torchvision" (no FFCV needed; slower).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from ._ffcv import require_ffcv

TORCHVISION_SETS = {"cifar10": 10, "cifar100": 100, "flowers102": 102, "pets": 37}
DEFAULT_CACHE = os.environ.get("CRATE_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "crate_fast"))


@dataclass
class Loaders:
    train: object
    val: object
    num_classes: int


@dataclass
class LoaderOptions:
    batch_size: int
    img_size: int
    num_workers: int
    device: torch.device
    dtype: torch.dtype = torch.float32
    distributed: bool = False
    seed: int = 0
    flip: bool = True
    scale: tuple = (0.08, 1.0)
    ratio: tuple = (3 / 4, 4 / 3)
    crop_ratio: float = 224 / 256
    val_batch_size: int | None = None
    progressive: bool = False
    os_cache: bool = True
    synthetic_steps: int = 50
    num_classes: int = 1000          # synthetic only


def kind_of(data: str) -> str:
    """digits | synthetic | beton_dir | image_folder | a torchvision name; raises a clear error otherwise."""
    if data in ("digits", "synthetic") or data in TORCHVISION_SETS:
        return data
    if os.path.isdir(data):
        if all(os.path.isfile(os.path.join(data, f"{s}.beton")) for s in ("train", "val")):
            return "beton_dir"
        if all(os.path.isdir(os.path.join(data, s)) for s in ("train", "val")):
            return "image_folder"
        raise ValueError(f"--data {data!r}: expected train.beton and val.beton, or train/ and val/ ImageFolders")
    raise FileNotFoundError(f"--data {data!r} is not a directory nor one of: digits, synthetic, "
                            f"{', '.join(TORCHVISION_SETS)}")


def beton_num_classes(path: str) -> int:
    require_ffcv()
    from ffcv.reader import Reader

    r = Reader(path)
    return int(r.metadata[f"f{r.field_names.index('label')}"].max()) + 1


def _torchvision_set(name: str, root: str, train: bool):
    """A torchvision data set of (PIL image, label), downloaded into root if missing."""
    import torchvision.datasets as tvd

    root = os.path.join(root, name)
    make = {
        "cifar10": lambda dl: tvd.CIFAR10(root, train=train, download=dl),
        "cifar100": lambda dl: tvd.CIFAR100(root, train=train, download=dl),
        # The CRATE finetune recipe trains Flowers102 on its 'train' split only and tests on 'test'.
        "flowers102": lambda dl: tvd.Flowers102(root, split="train" if train else "test", download=dl),
        "pets": lambda dl: tvd.OxfordIIITPet(root, split="trainval" if train else "test", download=dl),
    }[name]
    try:
        return make(False)
    except (RuntimeError, FileNotFoundError):
        pass
    try:
        return make(True)
    except Exception as e:  # URLError, HTTP errors, DNS failures: all mean "could not fetch it"
        raise RuntimeError(f"{name} is not in {root} and could not be downloaded ({type(e).__name__}: {e}). "
                           f"Without network, copy torchvision's {name} files into {root} "
                           f"(or pass --data-root DIR).") from e


class _PILToArray:
    """Adapts a (PIL image, label) data set to FFCV's writer: (H, W, 3) uint8 arrays."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, label = self.ds[i]
        return np.asarray(img.convert("RGB"), dtype=np.uint8), int(label)


class _ArrayToPIL(torch.utils.data.Dataset):
    """The other way round, for torchvision transforms: (uint8 array, label) -> (PIL image, label)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from PIL import Image

        arr, label = self.ds[i]
        return Image.fromarray(arr), label


def _folder_classes(data: str) -> list[str]:
    """The class list of DATA/train and DATA/val, which must agree (labels are positions in it)."""
    from .write_ffcv import class_names

    train, val = (class_names(os.path.join(data, s)) for s in ("train", "val"))
    if train != val:
        diff = sorted(set(train) ^ set(val))
        raise ValueError(f"{data}: train/ and val/ have different class folders ({', '.join(diff[:10])}); "
                         "their labels would not match")
    return train


class _Transformed(torch.utils.data.Dataset):
    def __init__(self, ds, transform):
        self.ds, self.transform = ds, transform

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img, label = self.ds[i]
        return self.transform(img), label


def _betons(data: str, kind: str, cache_dir: str, data_root: str) -> tuple[dict, int]:
    """train/val .beton paths for any non-synthetic source, converting into cache_dir on first use."""
    from .digits import NUM_CLASSES, digits_betons
    from .write_ffcv import write_beton, write_image_folder

    if kind == "digits":
        return digits_betons(cache_dir), NUM_CLASSES
    if kind == "beton_dir":
        paths = {s: os.path.join(data, f"{s}.beton") for s in ("train", "val")}
        return paths, beton_num_classes(paths["train"])
    digest = hashlib.sha1(os.path.abspath(data).encode()).hexdigest()[:12]
    key = kind if kind in TORCHVISION_SETS else f"folder-{digest}"
    paths = {s: os.path.join(cache_dir, key, f"{s}.beton") for s in ("train", "val")}
    n = TORCHVISION_SETS.get(kind) or len(_folder_classes(data))
    if not all(os.path.exists(p) for p in paths.values()):
        for split in ("train", "val"):
            if kind in TORCHVISION_SETS:
                write_beton(_PILToArray(_torchvision_set(kind, data_root, split == "train")), paths[split],
                            max_resolution=256, workers=os.cpu_count() or 1)
            else:
                scan = write_image_folder(os.path.join(data, split), paths[split])
                if scan.skipped:
                    print(f"[data] {split}: skipped {len(scan.skipped)} unreadable files, e.g. {scan.skipped[0]}")
    return paths, n


def _torchvision_datasets(data: str, kind: str, data_root: str):
    from .digits import ArrayDataset, digits_arrays
    from .write_ffcv import ImageFiles, scan_image_folder

    if kind == "digits":
        arrays = digits_arrays()
        return {s: _ArrayToPIL(ArrayDataset(*arrays[s])) for s in ("train", "val")}, 10
    if kind in TORCHVISION_SETS:
        return {s: _torchvision_set(kind, data_root, s == "train") for s in ("train", "val")}, TORCHVISION_SETS[kind]
    if kind == "image_folder":
        classes = _folder_classes(data)
        sets = {s: _ArrayToPIL(ImageFiles(scan_image_folder(os.path.join(data, s)).samples)) for s in ("train", "val")}
        return sets, len(classes)
    raise ValueError(f"--loader torchvision cannot read {kind} data; use --loader ffcv")


def build_loaders(data: str, opts: LoaderOptions, *, loader: str = "ffcv", cache_dir: str = DEFAULT_CACHE,
                  data_root: str | None = None) -> Loaders:
    """(train, val) loaders and the class count for a --data value (see the module docstring)."""
    from . import fallback, loaders

    kind = kind_of(data)
    data_root = data_root or os.path.join(cache_dir, "datasets")
    vbs = opts.val_batch_size or opts.batch_size
    if kind == "synthetic":
        make = lambda steps: fallback.SyntheticLoader(  # noqa: E731
            batch_size=opts.batch_size, img_size=opts.img_size, num_classes=opts.num_classes, steps=steps,
            device=opts.device, dtype=opts.dtype, seed=opts.seed)
        return Loaders(make(opts.synthetic_steps), make(max(1, opts.synthetic_steps // 10)), opts.num_classes)
    common = dict(num_workers=opts.num_workers, device=opts.device, dtype=opts.dtype, distributed=opts.distributed,
                  seed=opts.seed)
    if loader == "ffcv":
        paths, n = _betons(data, kind, cache_dir, data_root)
        train = loaders.train_loader(paths["train"], batch_size=opts.batch_size, img_size=opts.img_size,
                                     flip=opts.flip, scale=opts.scale, ratio=opts.ratio, os_cache=opts.os_cache,
                                     progressive=opts.progressive, **common)
        val = loaders.val_loader(paths["val"], batch_size=vbs, img_size=opts.img_size, crop_ratio=opts.crop_ratio,
                                 os_cache=opts.os_cache, **common)
        return Loaders(train, val, n)
    if loader != "torchvision":
        raise ValueError(f"loader must be 'ffcv' or 'torchvision', got {loader!r}")
    sets, n = _torchvision_datasets(data, kind, data_root)
    tr = fallback.train_transform(opts.img_size, opts.scale, opts.ratio, opts.flip)
    va = fallback.val_transform(opts.img_size, opts.crop_ratio)
    train = fallback.TorchvisionLoader(_Transformed(sets["train"], tr), batch_size=opts.batch_size, train=True,
                                       drop_last=True, **common)
    val = fallback.TorchvisionLoader(_Transformed(sets["val"], va), batch_size=vbs, train=False, drop_last=False,
                                     **common)
    return Loaders(train, val, n)
