"""Pictures for the analysis: image files, the embedded digits, or scikit-image's bundled photographs,
resized and ImageNet-normalized as the CRATE notebooks' preprocess does."""
from __future__ import annotations

import numpy as np
import torch

from crate_fast.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, load_rgb
from crate_fast.data.digits import digits_arrays

# scikit-image's bundled photographs (no download); stereo_motorcycle is a (left, right, disparity) triple,
# of which the left view is drawn (scikit-image 0.26 dropped the motorcycle_left alias).
PHOTOS = ["astronaut", "chelsea", "coffee", "stereo_motorcycle", "rocket", "hubble_deep_field"]


def load_images(spec: list[str] | None, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(normalized fp32 batch (B, 3, size, size), uint8 pictures (B, size, size, 3) for display).

    spec: image paths, ["digits"] (6 images of the embedded digits validation set) or None (scikit-image's
    photographs). Each picture is resized to size x size (PIL bicubic) and normalized with ImageNet's mean
    and std, as the notebooks' preprocess does (they resize with LANCZOS). Raises ValueError for a file
    that cannot be read as an image."""
    from PIL import Image

    if spec == ["digits"]:
        arrays = digits_arrays()["val"][0][:6]
        pics = [Image.fromarray(a) for a in arrays]
    elif spec:
        pics = []
        for path in spec:
            try:
                pics.append(Image.fromarray(load_rgb(path)))      # upright, any PIL mode, 8-bit RGB
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read image {path!r}: {e}") from e
    else:
        from skimage import data as skd

        photos = [getattr(skd, name)() for name in PHOTOS]
        pics = [Image.fromarray(p[0] if isinstance(p, tuple) else p).convert("RGB") for p in photos]
    arr = np.stack([np.asarray(p.resize((size, size), Image.BICUBIC)) for p in pics])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return x, arr
