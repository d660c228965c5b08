"""The embedded default data set: scikit-learn's bundled 8x8 handwritten digits (1,797 real images).

No network needed. Images are upscaled to 32 x 32 RGB; a fixed seeded split keeps 360 images (20%)
for validation. Written to .beton files on first use and reused afterwards.
"""
from __future__ import annotations

import os

import numpy as np

from .datasets import Images
from .prepare import cache_lock
from .writer import write_beton

SIZE = 32
NUM_CLASSES = 10
VAL_FRACTION = 0.2
SPLIT_SEED = 0
VERSION = 1          # bump when the stored images change, so old caches are not reused


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train': (images, labels), 'val': ...}; images (n, 32, 32, 3) uint8, labels (n,) int64."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    gray = (d.images * (255.0 / 16.0)).round().astype(np.uint8)                  # 0..16 -> 0..255
    big = np.stack([np.asarray(Image.fromarray(g).resize((SIZE, SIZE), Image.BICUBIC)) for g in gray])
    rgb = np.repeat(big[..., None], 3, axis=-1)
    labels = d.target.astype(np.int64)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_val = int(round(len(labels) * VAL_FRACTION))
    val, train = perm[:n_val], perm[n_val:]
    return {"train": (rgb[train], labels[train]), "val": (rgb[val], labels[val])}


def digits_betons(cache_dir: str) -> dict[str, str]:
    """Paths of the digits train/val .beton files (class names '0'..'9' recorded with them), written
    into cache_dir on first use: by one process at a time (prepare.cache_lock), the others then find
    them written. Raises like writer.write_beton."""
    paths = {split: os.path.join(cache_dir, f"digits-v{VERSION}-{split}.beton") for split in ("train", "val")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    with cache_lock(cache_dir, f"digits-v{VERSION}"):
        if all(os.path.exists(p) for p in paths.values()):         # written while we waited for the lock
            return paths
        for split, (images, labels) in digits_arrays().items():
            # Raw pixels: tiny images decode fastest uncompressed, and nothing is lost.
            write_beton(Images(list(zip(images, labels, strict=True))), paths[split], max_resolution=None,
                        compress_probability=0.0, classes=[str(d) for d in range(NUM_CLASSES)])
    return paths
