"""Data loading speed: FFCV vs the torchvision fallback on the same JPEG folder, same transforms
(RandomResizedCrop 224 + flip, uint8 batches normalized to float), same worker count.

The folder holds ImageNet-sized JPEGs (crops of scikit-image's photographs, 375-500 px). FFCV reads a
.beton written from it twice: as full-size JPEGs (the same bytes to decode as torchvision) and with
FFCV's recommended storage (max side 256, half raw pixels), which is what train.py writes.
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
    full, recipe = str(out / "full.beton"), str(out / "recipe.beton")
    write_image_folder(str(jpeg_folder), full, workers=WORKERS, max_resolution=None, compress_probability=1.0,
                       progress=False)
    write_image_folder(str(jpeg_folder), recipe, workers=WORKERS, max_resolution=256, compress_probability=0.5,
                       progress=False)
    return {"ffcv_full_jpeg": full, "ffcv_recipe": recipe}


def _loader(kind, jpeg_folder, betons):
    from crate_fast.data import train_loader
    from crate_fast.data.fallback import TorchvisionLoader, train_transform

    if kind == "torchvision":
        import torchvision

        ds = torchvision.datasets.ImageFolder(str(jpeg_folder), transform=train_transform(RES))
        return TorchvisionLoader(ds, batch_size=BATCH, train=True, num_workers=WORKERS, device="cpu",
                                 dtype=torch.float32, distributed=False, seed=0, drop_last=True)
    return train_loader(betons[kind], batch_size=BATCH, img_size=RES, num_workers=WORKERS, device="cpu")


@pytest.mark.parametrize("kind", ["torchvision", "ffcv_full_jpeg", "ffcv_recipe"])
def test_loader_train_epoch(benchmark, kind, jpeg_folder, betons):
    benchmark.group = f"data-train-{RES}px-{WORKERS}workers"
    loader = _loader(kind, jpeg_folder, betons)

    def epoch():
        n = 0
        for images, _ in loader:
            n += images.shape[0]
        assert n == len(loader) * BATCH
    epoch()                                   # FFCV compiles its pipeline; torchvision starts workers
    seconds = run(benchmark, epoch, rounds=3, warmup=0)
    annotate(benchmark, seconds, images=len(loader) * BATCH, loader=kind, workers=WORKERS, res=RES)
