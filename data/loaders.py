"""FFCV loaders for CRATE: decode + crop on CPU workers, uint8 to the device, normalize there.

    train = train_loader("train.beton", batch_size=256, img_size=224, num_workers=12, device="cuda")
    for images, labels in train:      # images: (B, 3, S, S) in `dtype`, channels_last, on `device`
        ...

Crop options use timm's names: training decodes a RandomResizedCrop (`scale`: the range of the crop's
area fraction, `ratio`: the range of its aspect ratio) with an optional horizontal flip; evaluation a
center crop of `crop_pct` (224/256 by default) of the short side, resized to img_size. A training
loader may also take a `batch_transform` (e.g. augment.RandAugment) that runs on the uint8 batch on
the device, before normalization. Under torchrun (distributed=True) every rank reads its own shard
of the one order of sharding.py, the same order the torchvision fallback reads.
"""
from __future__ import annotations

import logging
import operator
import os
import queue
import time
from collections.abc import Callable

import numpy as np
import torch

from . import sharding
from ._ffcv import require_ffcv

log = logging.getLogger(__name__)

# ImageNet's channel statistics, the one home of them in crate-fast: in [0, 1] as timm names them (what a
# pretrained_cfg or a float image in [0, 1] needs), and scaled to 0-255 for the loaders, which normalize
# uint8 pixels on the device.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
IMAGENET_MEAN = tuple(m * 255 for m in IMAGENET_DEFAULT_MEAN)
IMAGENET_STD = tuple(s * 255 for s in IMAGENET_DEFAULT_STD)
DEFAULT_CROP_PCT = 224 / 256
# How long stopping an abandoned FFCV epoch may wait for its thread (it finishes the batch it is
# decoding first); past that the thread is left to end on its own, and a warning says so.
STOP_TIMEOUT_S = 60.0


def check_beton(path: str) -> None:
    """A clear error for a missing, empty, truncated or foreign file, before FFCV reads it:
    FileNotFoundError when missing, ValueError otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist (write one with python -m crate_fast.data.write_ffcv)")
    require_ffcv()
    from ffcv.reader import Reader

    size = os.path.getsize(path)
    try:
        reader = Reader(path)
        n, table_at = int(reader.num_samples), int(reader.header["alloc_table_ptr"])
        # The allocation table is written last: a truncated file lacks it, or its pages.
        if len(reader.metadata) != n or table_at > size or len(reader.alloc_table) == 0:
            raise ValueError("the file is truncated")
        if int((reader.alloc_table["ptr"] + reader.alloc_table["size"]).max()) > table_at:
            raise ValueError("the file is truncated")
    except Exception as e:  # FFCV raises a zoo of errors on foreign bytes; turn them into one message
        raise ValueError(f"{path!r} is not a readable FFCV .beton file ({type(e).__name__}: {e})") from e
    if n == 0:
        raise ValueError(f"{path!r} holds no samples")


def _check_center_crop(path: str, crop_pct: float) -> None:
    """ValueError if an image of the .beton is too small for a center crop of crop_pct: FFCV would
    crop int(crop_pct * short side) = 0 pixels, and OpenCV then aborts the whole process."""
    from ffcv.reader import Reader

    reader = Reader(path)
    meta = reader.metadata[f"f{reader.field_names.index('image')}"]
    short = np.minimum(meta["height"], meta["width"]).astype(np.float64)
    thin = int(np.count_nonzero((crop_pct * short).astype(np.int64) == 0))
    if thin:
        raise ValueError(f"{path!r}: {thin} images have a short side of {int(short.min())} px, too small for a "
                         f"center crop of crop_pct={crop_pct}; rewrite the file with python -m "
                         "crate_fast.data.write_ffcv (it leaves such images out) or raise crop_pct")


def _shards(shuffle: bool, seed: int, distributed: bool, equal: bool):
    """A TraversalOrder for FFCV: sharding.shard_indices of the loader's samples at each epoch, this
    rank's shard. FFCV takes an order *instance* and calls it with the loader."""
    from ffcv.traversal_order.base import TraversalOrder

    class Shards(TraversalOrder):
        def __init__(self, loader=None):      # FFCV constructs us first without, then with the loader
            if loader is not None:
                super().__init__(loader)

        def __call__(self, loader):
            return Shards(loader)

        def sample_order(self, epoch: int) -> np.ndarray:
            rank, world = sharding.rank_world() if distributed else (0, 1)
            return sharding.shard_indices(self.indices, epoch=epoch, shuffle=shuffle, seed=seed, rank=rank,
                                          world=world, equal=equal)

    return Shards()


class Normalize:
    """uint8 (B, 3, H, W) batch of any layout -> (x - mean) / std on `device` in `dtype`, channels_last.

    One fused pass, x * (1 / std) + (-mean / std), written straight into a channels_last result: the
    naive (x.float() - mean) / std then .contiguous() makes three full-size float passes and, on a
    CPU, cost as much per image as FFCV's whole decode + crop.
    """

    def __init__(self, device, dtype, mean, std):
        self.device, self.dtype = torch.device(device), dtype
        self.mean = torch.tensor(mean, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device, dtype=torch.float32).view(1, 3, 1, 1)
        self.scale, self.shift = 1 / self.std, -self.mean / self.std

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        out = torch.empty(x.shape, device=self.device, dtype=self.dtype, memory_format=torch.channels_last)
        return torch.addcmul(self.shift, x, self.scale, out=out)


class NormalizingLoader:
    """Iterates `loader`'s (uint8 (B, 3, H, W) images, labels) batches, moving them to the device,
    applying batch_transform there (uint8 in, uint8 of the same shape out; training loaders only, e.g.
    augment.RandAugment) and then normalizing. Labels come out int64 (B,). Images and labels are fresh
    memory, never the source's reused buffers. Shared by the FFCV loaders and the torchvision fallback.

    A pass that ends early (the consumer breaks out of its loop, or drops the iterator, or an exception
    leaves the loop) is ended for the source too: subclasses free what the source's pass holds in
    _end_pass (see DeviceLoader)."""

    def __init__(self, loader, device, dtype, mean, std, batch_transform: Callable | None = None):
        self.loader, self.device, self.batch_transform = loader, torch.device(device), batch_transform
        self.normalize = Normalize(device, dtype, mean, std)
        self.mean, self.std = self.normalize.mean, self.normalize.std

    def __len__(self) -> int:
        return len(self.loader)

    def _start_pass(self):
        """The source's iterator for one pass."""
        return iter(self.loader)

    def _end_pass(self, batches) -> None:
        """Called when a pass ends, read to the end or not, with _start_pass's iterator."""

    def __iter__(self):
        # A generator: Python closes it when the consumer breaks out of its loop or drops it (or an
        # exception unwinds the loop), which runs the `finally` below.
        batches = self._start_pass()
        try:
            for images, labels in batches:
                if self.batch_transform is not None:
                    images = self.batch_transform(images.to(self.device, non_blocking=True))
                # copy=True: on the CPU .to() / .long() would hand out FFCV's label buffer, which it reuses.
                yield (self.normalize(images),
                       labels.to(self.device, torch.long, non_blocking=True, copy=True).view(-1))
        finally:
            self._end_pass(batches)


def stop_epoch(epoch, timeout: float = STOP_TIMEOUT_S) -> None:
    """Stop an FFCV EpochIterator (a thread that decodes batches ahead into a queue of `batches_ahead`)
    whose consumer stopped early, and free its buffers.

    Left alone it never ends (libffcv/ffcv#393): its thread blocks on the full queue and, as the
    thread refers to the iterator, neither is ever collected: a thread and its batch buffers leaked per
    abandoned epoch. FFCV's close() only sets the thread's stop event (which it checks each time the
    queue is full for 0.5 s) and leaves the memory context; but once its last batch is decoded the
    thread puts its end marker on the queue without a timeout, and waits on a full queue forever. So:
    set the stop event, wait for the thread, and empty the queue only when it has no batch left to
    decode (emptying it earlier would let it decode the rest of the epoch); then close() (after the
    thread, which reads the memory it frees) and mark it closed, so that its __del__ does not close
    it twice. An iterator that already ended (its end marker read) passes through unchanged."""
    epoch.terminate_event.set()
    deadline = time.monotonic() + timeout
    while epoch.is_alive() and time.monotonic() < deadline:
        if operator.length_hint(epoch.iter_ixes) == 0:          # decoding done: only puts are left
            try:
                while True:
                    epoch.output_queue.get_nowait()
            except queue.Empty:
                pass
        epoch.join(0.05)
    if epoch.is_alive():
        log.warning("an FFCV epoch thread did not stop within %.0f s; leaving it to end on its own", timeout)
        return
    if not epoch.closed:
        epoch.close()
        epoch.closed = True


class DeviceLoader(NormalizingLoader):
    """An FFCV loader's batches on the device, normalized. A pass the consumer leaves early (`break`)
    stops FFCV's epoch thread and frees its buffers (stop_epoch)."""

    def __init__(self, loader, device, dtype, mean, std, decoder=None, batch_transform: Callable | None = None):
        super().__init__(loader, device, dtype, mean, std, batch_transform)
        self.decoder = decoder

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per epoch."""
        return len(self.loader.first_traversal_order)

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass use epoch `epoch`'s order (exact resume)."""
        self.loader.next_epoch = epoch

    def _end_pass(self, batches) -> None:
        stop_epoch(batches)

    def set_resolution(self, res: int) -> None:
        """Training crop size (res x res) from the next pass on (progressive resizing): FFCV compiles a
        pass's pipeline when the pass starts. Raises RuntimeError on an evaluation loader, or on a
        training loader made without progressive=True (whose pipeline is compiled once: the new size
        would never be used); ValueError for res < 1."""
        if self.decoder is None:
            raise RuntimeError("set_resolution is only available on training loaders")
        if not self.loader.recompile:
            raise RuntimeError("set_resolution needs a training loader made with progressive=True: FFCV compiles "
                               "its pipeline once otherwise, and would keep the first size")
        if res < 1:
            raise ValueError(f"resolution must be positive, got {res}")
        self.decoder.output_size = (res, res)


def _loader(path, batch_size, num_workers, pipelines, order, drop_last, os_cache, seed, recompile):
    check_beton(path)
    from ffcv.loader import Loader

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # Sharding is ours (_shards), so FFCV itself runs undistributed.
    return Loader(path, batch_size=batch_size, num_workers=max(1, num_workers), os_cache=os_cache,
                  order=order, distributed=False, seed=seed, pipelines=pipelines, drop_last=drop_last,
                  recompile=recompile, batches_ahead=2)


def train_loader(path: str, *, batch_size: int, img_size: int = 224, num_workers: int | None = None,
                 device: str | torch.device = "cpu", distributed: bool = False, seed: int = 0,
                 dtype: torch.dtype = torch.float32, flip: bool = True, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), os_cache: bool = True, drop_last: bool = True,
                 progressive: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 batch_transform: Callable | None = None) -> DeviceLoader:
    """Training batches from a .beton: RandomResizedCrop(img_size, scale, ratio) decode, flip, then
    batch_transform on the device's uint8 batch, then normalization: (B, 3, img_size, img_size) in
    `dtype`, channels_last, and int64 labels (B,).

    os_cache=True reads through the page cache (fast when the file fits in RAM); False streams with
    FFCV's own cache. progressive=True allows set_resolution() between epochs (recompiles the pipeline).
    num_workers: FFCV's decoding threads (at most the core count); PyTorch's own thread count is kept.
    Raises FileNotFoundError / ValueError for a missing or unreadable file (check_beton) or batch_size <= 0.
    """
    require_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.transforms import RandomHorizontalFlip, Squeeze, ToTensor, ToTorchImage

    decoder = RandomResizedCropRGBImageDecoder((img_size, img_size), scale=tuple(scale), ratio=tuple(ratio))
    image = [decoder] + ([RandomHorizontalFlip()] if flip else []) + [ToTensor(), ToTorchImage(channels_last=True)]
    pipelines = {"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()]}
    order = _shards(shuffle=True, seed=seed, distributed=distributed, equal=True)
    loader = _loader(path, batch_size, num_workers or os.cpu_count() or 1, pipelines, order, drop_last, os_cache,
                     seed, recompile=progressive)
    return DeviceLoader(loader, device, dtype, mean, std, decoder, batch_transform)


def val_loader(path: str, *, batch_size: int, img_size: int = 224, num_workers: int | None = None,
               device: str | torch.device = "cpu", distributed: bool = False, seed: int = 0,
               dtype: torch.dtype = torch.float32, crop_pct: float = DEFAULT_CROP_PCT, os_cache: bool = True,
               mean=IMAGENET_MEAN, std=IMAGENET_STD) -> DeviceLoader:
    """Evaluation batches: the center crop_pct of the short side (224/256 by default) resized to
    img_size, every sample exactly once across ranks; shapes and dtypes as train_loader's.
    Raises ValueError for crop_pct outside (0, 1] or an image too small for that crop
    (_check_center_crop), and like train_loader for a bad file."""
    require_ffcv()
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
    from ffcv.transforms import Squeeze, ToTensor, ToTorchImage

    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    # FFCV calls the center crop's fraction `ratio`; here that name is the RandomResizedCrop aspect range.
    image = [CenterCropRGBImageDecoder((img_size, img_size), ratio=crop_pct), ToTensor(),
             ToTorchImage(channels_last=True)]
    pipelines = {"image": image, "label": [IntDecoder(), ToTensor(), Squeeze()]}
    order = _shards(shuffle=False, seed=seed, distributed=distributed, equal=False)
    loader = _loader(path, batch_size, num_workers or os.cpu_count() or 1, pipelines, order, False, os_cache,
                     seed, recompile=False)
    _check_center_crop(path, crop_pct)          # after _loader: check_beton has vouched for the file
    return DeviceLoader(loader, device, dtype, mean, std)
