"""What train.py's --data accepts, turned into (train, val) loaders.

- ``digits``: the embedded default (scikit-learn's 8x8 digits), written to .beton on first use;
- ``synthetic``: random tensors on the device, for benchmarks;
- a directory holding ``train.beton`` and ``val.beton``;
- a directory holding ``train/`` and ``val/`` ImageFolders (converted to .beton in the cache on first
  use, reused while neither folder changes; images that cannot be stored are skipped and listed). The
  cache entry is keyed by the folders' contents (every file's relative name, size and modification
  time, both splits) and the conversion's version: a folder that changed is converted again (saying
  so), and the outdated entry removed;
- ``cifar10``, ``cifar100``, ``flowers102``, ``pets``: torchvision's data sets, downloaded into
  --data-root, or read from there when already on disk;
- token data for the language models (text.py): ``pydocs`` (the embedded corpus) or a directory holding
  nanoGPT's ``train.bin`` and ``val.bin``; batches of random windows, (x, y) token ids. Their
  Loaders.num_classes is the vocabulary size.

loader="ffcv" (default) or "torchvision" (no FFCV needed; slower). Both read the same samples in the
same order for the same seed (sharding.py).

The .beton files a source is converted to record their class names (records.py); a ``train.beton`` +
``val.beton`` directory whose records differ is refused, one without records is read with a warning.
Under torch.distributed the conversions and downloads run once per node, on local rank 0, while the
other ranks wait, and once per cache directory across nodes (prepare.py). Progress and problems are
logged (logger ``crate_fast.data.sources``): conversions at INFO, skipped files and unchecked class
names at WARNING.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import fallback, loaders, sharding, text
from ._ffcv import require_ffcv
from .datasets import Images
from .digits import NUM_CLASSES as DIGITS_CLASSES
from .digits import digits_arrays, digits_betons
from .folders import class_names, folder_fingerprint, scan_image_folder
from .loaders import DEFAULT_CROP_PCT
from .prepare import cache_lock, prepare_once
from .records import beton_classes, record_path
from .writer import write_beton, write_image_folder

log = logging.getLogger(__name__)

TORCHVISION_SETS = {"cifar10": 10, "cifar100": 100, "flowers102": 102, "pets": 37}
# Bump when the conversion of image folders changes, so that entries written before are converted again
# (2: EXIF orientation applied, 16-bit and float images by their range, too-thin images left out).
FOLDER_CONVERSION = 2
FOLDER_MAX_RESOLUTION = 256      # FFCV's ImageNet recipe: longest side stored
DEFAULT_CACHE = os.environ.get("CRATE_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "crate_fast"))


@dataclass
class Loaders:
    """build_loaders' result: the training and evaluation loaders and the class count."""

    train: object
    val: object
    num_classes: int
    tokenizer: str | None = None     # token data: the tokenizer of its ids (text.TOKENIZERS)


@dataclass
class LoaderOptions:
    """What build_loaders makes. Crop options use timm's names: `scale` (area fraction range) and
    `ratio` (aspect ratio range) of the training RandomResizedCrop, `crop_pct` of the evaluation center
    crop. batch_transform: applied to the training batches on the device, uint8 before normalization
    (e.g. augment.RandAugment(2, 14)); None for none."""

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
    crop_pct: float = DEFAULT_CROP_PCT
    batch_transform: Callable | None = None
    val_batch_size: int | None = None
    progressive: bool = False
    os_cache: bool = True
    synthetic_steps: int = 50
    num_classes: int = 1000          # synthetic only
    block_size: int | None = None    # token data: tokens per window
    epoch_steps: int = 100           # token data: training batches per epoch (random windows)
    val_steps: int = 20              # token data: batches per validation


def kind_of(data: str) -> str:
    """digits | synthetic | pydocs | beton_dir | image_folder | token_dir | a torchvision name; raises a
    clear error otherwise."""
    if data in ("digits", "synthetic", "pydocs") or data in TORCHVISION_SETS:
        return data
    if os.path.isdir(data):
        if all(os.path.isfile(os.path.join(data, f"{s}.beton")) for s in ("train", "val")):
            return "beton_dir"
        if all(os.path.isfile(os.path.join(data, f"{s}.bin")) for s in ("train", "val")):
            return "token_dir"
        if all(os.path.isdir(os.path.join(data, s)) for s in ("train", "val")):
            return "image_folder"
        raise ValueError(f"--data {data!r}: expected train.beton and val.beton, train/ and val/ ImageFolders, or "
                         "train.bin and val.bin (token ids)")
    raise FileNotFoundError(f"--data {data!r} is not a directory nor one of: digits, synthetic, pydocs, "
                            f"{', '.join(TORCHVISION_SETS)}")


def beton_num_classes(path: str) -> int:
    """1 + the largest label stored in the .beton at path."""
    require_ffcv()
    from ffcv.reader import Reader

    r = Reader(path)
    return int(r.metadata[f"f{r.field_names.index('label')}"].max()) + 1


def _torchvision_set(name: str, root: str, train: bool):
    """A torchvision data set of (PIL image, label), downloaded into root if missing: by one process at a
    time (a lock file in root), so that processes sharing root never download into it at once."""
    with cache_lock(root, f"download-{name}"):
        return _open_or_download(name, root, train)


def _open_or_download(name: str, root: str, train: bool):
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


def _folder_classes(data: str) -> list[str]:
    """The class list of DATA/train and DATA/val, which must agree (labels are positions in it)."""
    train, val = (class_names(os.path.join(data, s)) for s in ("train", "val"))
    if train != val:
        diff = sorted(set(train) ^ set(val))
        raise ValueError(f"{data}: train/ and val/ have different class folders ({', '.join(diff[:10])}); "
                         "their labels would not match")
    return train


def _say_skipped(split: str, scan) -> None:
    if scan.skipped:
        path, why = scan.skipped[0]
        log.warning("%s: skipped %d files that cannot be stored, e.g. %s (%s)", split, len(scan.skipped), path, why)


def _folder_betons(data: str, cache_dir: str) -> tuple[dict, int]:
    """train/val .beton paths of a train/ + val/ ImageFolder pair, converted into a cache entry keyed by
    the folders' contents (see the module docstring), and the class count. One process at a time
    converts a folder (a lock per folder path in cache_dir); one that waited finds the entry written."""
    n = len(_folder_classes(data))
    content = hashlib.sha256(f"{FOLDER_CONVERSION}:{FOLDER_MAX_RESOLUTION}".encode())
    for split in ("train", "val"):
        content.update(folder_fingerprint(os.path.join(data, split)).encode())
    prefix = "folder-" + hashlib.sha1(os.path.abspath(data).encode()).hexdigest()[:12]
    entry = os.path.join(cache_dir, f"{prefix}-{content.hexdigest()[:16]}")
    paths = {s: os.path.join(entry, f"{s}.beton") for s in ("train", "val")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths, n
    with cache_lock(cache_dir, prefix):
        if all(os.path.exists(p) for p in paths.values()):         # converted while we waited for the lock
            return paths, n
        # Earlier entries of this folder (any other contents; the bare prefix is the old, path-only key).
        older = sorted(os.path.join(cache_dir, e) for e in (os.listdir(cache_dir) if os.path.isdir(cache_dir) else [])
                       if e.startswith(prefix) and os.path.join(cache_dir, e) != entry)
        if older:
            log.info("%s changed since it was converted (files added, removed or rewritten, or a newer "
                     "conversion): converting it again into %s", data, entry)
        else:
            log.info("converting %s into %s", data, entry)
        for split in ("train", "val"):
            _say_skipped(split, write_image_folder(os.path.join(data, split), paths[split],
                                                   max_resolution=FOLDER_MAX_RESOLUTION))
        for old in older:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed the outdated conversion %s", old)
    return paths, n


def _beton_dir(data: str) -> tuple[dict, int]:
    """train/val .beton paths of a directory holding both, and the class count, after comparing the
    class names recorded with them (records.py). Raises ValueError when the records differ: label i
    would mean one class in training and another in validation. Without a record for either file
    (another tool, an older crate-fast) nothing can be compared: a warning says so, and the class count
    is 1 + train.beton's largest label, as before records."""
    paths = {s: os.path.join(data, f"{s}.beton") for s in ("train", "val")}
    names = {s: beton_classes(p) for s, p in paths.items()}
    unrecorded = [s for s in ("train", "val") if names[s] is None]
    if unrecorded:
        log.warning("%s: cannot check that train.beton and val.beton use the same class names: %s no class-name "
                    "record that matches it (%s: missing, or written for another file; the .beton was written by "
                    "another tool or an older crate-fast). If the two splits were written from folders with "
                    "different class folders, validation labels are silently wrong; writing them again with "
                    "python -m crate_fast.data.write_ffcv records the names.", data,
                    " and ".join(f"{s}.beton has" for s in unrecorded),
                    ", ".join(os.path.basename(record_path(paths[s])) for s in unrecorded))
        return paths, beton_num_classes(paths["train"])
    train, val = names["train"], names["val"]
    if train != val:
        only_train, only_val = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        if only_train or only_val:
            what = "; ".join(f"only in {s}.beton: {', '.join(d[:10])}{' ...' if len(d) > 10 else ''}"
                             for s, d in (("train", only_train), ("val", only_val)) if d)
        else:
            what = "the same names in another order"
        raise ValueError(f"{data}: train.beton and val.beton were written with different class names ({what}), so "
                         "a label means one class in training and another in validation. Give both source folders "
                         "the same class folders (a class without images in a split may be an empty folder there) "
                         "and write the split(s) again with python -m crate_fast.data.write_ffcv SRC OUT.beton")
    return paths, len(train)


def _betons(data: str, kind: str, cache_dir: str, data_root: str) -> tuple[dict, int]:
    """train/val .beton paths for any non-synthetic source, converting into cache_dir on first use
    (one process at a time: a lock per source in cache_dir), and the class count."""
    if kind == "digits":
        return digits_betons(cache_dir), DIGITS_CLASSES
    if kind == "beton_dir":
        return _beton_dir(data)
    if kind == "image_folder":
        return _folder_betons(data, cache_dir)
    paths = {s: os.path.join(cache_dir, kind, f"{s}.beton") for s in ("train", "val")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths, TORCHVISION_SETS[kind]
    with cache_lock(cache_dir, kind):
        if not all(os.path.exists(p) for p in paths.values()):     # else converted while we waited
            log.info("converting torchvision's %s into %s", kind, os.path.dirname(paths["train"]))
            for split in ("train", "val"):
                source = _torchvision_set(kind, data_root, split == "train")
                classes = getattr(source, "classes", None)        # torchvision's names, where it has them
                if classes is not None and len(classes) != TORCHVISION_SETS[kind]:
                    classes = None
                write_beton(Images(source), paths[split], max_resolution=256, workers=os.cpu_count() or 1,
                            classes=classes)
    return paths, TORCHVISION_SETS[kind]


def _sources(data: str, kind: str, data_root: str) -> tuple[dict, int]:
    """{split: indexed (image, label) pairs} for the torchvision loader (see datasets.Images), and the
    class count. Image folders list the same samples as their FFCV conversion."""
    if kind == "digits":
        arrays = digits_arrays()
        return {s: list(zip(*arrays[s], strict=True)) for s in ("train", "val")}, DIGITS_CLASSES
    if kind in TORCHVISION_SETS:
        return {s: _torchvision_set(kind, data_root, s == "train") for s in ("train", "val")}, TORCHVISION_SETS[kind]
    if kind == "image_folder":
        classes = _folder_classes(data)
        sets = {}
        for s in ("train", "val"):
            scan = scan_image_folder(os.path.join(data, s), max_resolution=FOLDER_MAX_RESOLUTION)
            _say_skipped(s, scan)
            sets[s] = scan.samples
        return sets, len(classes)
    raise ValueError(f"--loader torchvision cannot read {kind} data; use --loader ffcv")


def _token_loaders(directory: str, opts: LoaderOptions) -> Loaders:
    """Random-window loaders of a token directory (text.TokenWindows), this rank's windows."""
    if opts.block_size is None:
        raise ValueError("token data needs LoaderOptions.block_size (the tokens per window)")
    paths, meta = text.token_paths(directory), text.read_meta(directory)
    rank = sharding.rank_world()[0] if opts.distributed else 0
    common = dict(block_size=opts.block_size, device=opts.device, seed=opts.seed, rank=rank)
    train = text.TokenWindows(paths["train"], batch_size=opts.batch_size, steps=opts.epoch_steps, train=True, **common)
    val = text.TokenWindows(paths["val"], batch_size=opts.val_batch_size or opts.batch_size, steps=opts.val_steps,
                            train=False, **common)
    return Loaders(train, val, meta["vocab_size"], meta["tokenizer"])


def build_loaders(data: str, opts: LoaderOptions, *, loader: str = "ffcv", cache_dir: str = DEFAULT_CACHE,
                  data_root: str | None = None) -> Loaders:
    """(train, val) loaders and the class count for a --data value (see the module docstring).

    Raises FileNotFoundError / ValueError for a --data value that is not a source (kind_of), train/
    and val/ folders with different classes, an unknown loader, or a batch_transform with synthetic
    data (random floats, not images), a .beton directory whose class-name records differ (_beton_dir);
    RuntimeError when a conversion fails or a torchvision data set is missing and cannot be downloaded
    (under torch.distributed, on the ranks that waited for the one that failed, too).

    Under torch.distributed every rank of the default group must call this together: conversions and
    downloads run on each node's local rank 0 first (prepare.prepare_once), the other ranks wait.
    """
    kind = kind_of(data)
    data_root = data_root or os.path.join(cache_dir, "datasets")
    vbs = opts.val_batch_size or opts.batch_size
    if kind in ("pydocs", "token_dir"):
        return _token_loaders(data if kind == "token_dir" else prepare_once(lambda: text.pydocs_dir(cache_dir)), opts)
    if kind == "synthetic":
        if opts.batch_transform is not None:
            raise ValueError("batch_transform needs uint8 images; synthetic batches are random floats")
        make = lambda steps: fallback.SyntheticLoader(  # noqa: E731
            batch_size=opts.batch_size, img_size=opts.img_size, num_classes=opts.num_classes, steps=steps,
            device=opts.device, dtype=opts.dtype, seed=opts.seed)
        return Loaders(make(opts.synthetic_steps), make(max(1, opts.synthetic_steps // 10)), opts.num_classes)
    common = dict(num_workers=opts.num_workers, device=opts.device, dtype=opts.dtype, distributed=opts.distributed,
                  seed=opts.seed)
    if loader == "ffcv":
        paths, n = prepare_once(lambda: _betons(data, kind, cache_dir, data_root))
        train = loaders.train_loader(paths["train"], batch_size=opts.batch_size, img_size=opts.img_size,
                                     flip=opts.flip, scale=opts.scale, ratio=opts.ratio, os_cache=opts.os_cache,
                                     progressive=opts.progressive, batch_transform=opts.batch_transform, **common)
        val = loaders.val_loader(paths["val"], batch_size=vbs, img_size=opts.img_size, crop_pct=opts.crop_pct,
                                 os_cache=opts.os_cache, **common)
        return Loaders(train, val, n)
    if loader != "torchvision":
        raise ValueError(f"loader must be 'ffcv' or 'torchvision', got {loader!r}")
    if kind in TORCHVISION_SETS:      # downloads: once per node, the others then open the files
        sources, n = prepare_once(lambda: _sources(data, kind, data_root))
    else:                             # nothing is written: every rank reads the source at once
        sources, n = _sources(data, kind, data_root)
    tr = fallback.train_transform(opts.img_size, opts.scale, opts.ratio, opts.flip)
    va = fallback.val_transform(opts.img_size, opts.crop_pct)
    train = fallback.TorchvisionLoader(Images(sources["train"], "pil", tr), batch_size=opts.batch_size, train=True,
                                       drop_last=True, batch_transform=opts.batch_transform, **common)
    val = fallback.TorchvisionLoader(Images(sources["val"], "pil", va), batch_size=vbs, train=False,
                                     drop_last=False, **common)
    return Loaders(train, val, n)
