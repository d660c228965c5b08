"""Data loading speed: FFCV vs the torchvision fallback on the same JPEG folder, same transforms
(RandomResizedCrop 224 + flip), same worker count, two outputs:

- uint8: the batches as they leave the CPU in GPU training (the loaders normalize on the device), so
  this is the CPU work a GPU trainer pays for;
- float: normalized float32 channels_last batches on the CPU, as a CPU-only run gets them. The
  main process then writes 19 MB of floats per batch of 32 while the workers run, which on 2 cores
  costs as much as FFCV's whole decode.

The folder holds ImageNet-sized JPEGs (crops of scikit-image's photographs, 375-500 px). FFCV reads
.betons written from it three ways: full-size JPEGs (the same bytes to decode as torchvision), FFCV's
ImageNet storage (max side 256, half raw pixels; what train.py writes) and all raw pixels at max side
256 (`write_ffcv --compress-probability 0`: about 3x the disk/RAM, no JPEG decoding at all).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from _common import annotate, run

pytest.importorskip("ffcv")

N_IMAGES, WORKERS, BATCH, RES = 512, 2, 32, 224


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    from PIL import Image
    from skimage import data as skd

    root = tmp_path_factory.mktemp("jpegs")
    photos = [skd.astronaut(), skd.chelsea(), skd.coffee(), skd.rocket()]
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = int(rng.integers(420, 500)), int(rng.integers(330, 375))
        x, y = int(rng.integers(0, img.width - w // 2)), int(rng.integers(0, img.height - h // 2))
        crop = img.crop((x, y, x + w // 2, y + h // 2)).resize((w, h), Image.BICUBIC)
        os.makedirs(root / f"class{i % 4}", exist_ok=True)
        crop.save(root / f"class{i % 4}" / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def betons(jpeg_folder, tmp_path_factory):
    from crate_fast.data.write_ffcv import write_image_folder

    out = tmp_path_factory.mktemp("betons")
    storage = {"ffcv_full_jpeg": (None, 1.0), "ffcv_recipe": (256, 0.5), "ffcv_raw256": (256, 0.0)}
    paths = {}
    for kind, (max_res, jpeg_fraction) in storage.items():
        paths[kind] = str(out / f"{kind}.beton")
        write_image_folder(str(jpeg_folder), paths[kind], workers=WORKERS, max_resolution=max_res,
                           compress_probability=jpeg_fraction, progress=False)
    return paths


def _loader(kind, jpeg_folder, betons):
    from crate_fast.data import train_loader
    from crate_fast.data.fallback import TorchvisionLoader, train_transform

    if kind == "torchvision":
        import torchvision

        ds = torchvision.datasets.ImageFolder(str(jpeg_folder), transform=train_transform(RES))
        return TorchvisionLoader(ds, batch_size=BATCH, train=True, num_workers=WORKERS, device="cpu",
                                 dtype=torch.float32, distributed=False, seed=0, drop_last=True)
    return train_loader(betons[kind], batch_size=BATCH, img_size=RES, num_workers=WORKERS, device="cpu")


@pytest.mark.parametrize("kind", ["torchvision", "ffcv_full_jpeg", "ffcv_recipe", "ffcv_raw256"])
@pytest.mark.parametrize("output", ["uint8", "float"])
def test_loader_train_epoch(benchmark, output, kind, jpeg_folder, betons):
    benchmark.group = f"data-train-{RES}px-{WORKERS}workers-{output}"
    loader = _loader(kind, jpeg_folder, betons)
    batches = loader.loader if output == "uint8" else loader   # .loader: the uint8 batches before normalization
    dtype = torch.uint8 if output == "uint8" else torch.float32

    def epoch():
        n = 0
        for images, _ in batches:
            assert images.dtype == dtype
            n += images.shape[0]
        assert n == len(loader) * BATCH
    epoch()                                   # FFCV compiles its pipeline; torchvision starts workers
    seconds = run(benchmark, epoch, rounds=10, warmup=0)
    annotate(benchmark, seconds, images=len(loader) * BATCH, loader=kind, output=output, workers=WORKERS, res=RES)
