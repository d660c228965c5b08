"""Images as (H, W, 3) uint8 RGB arrays: the one decoder and the one data set adapter of crate_fast.data.

- :func:`load_rgb` decodes an image file, :func:`to_rgb_array` converts an opened PIL image; the FFCV
  writer, the torchvision fallback and the analysis tools all see the same pixels through them.
- :class:`Images` adapts any indexed (image, label) source (file paths, PIL images or arrays) to the
  form a consumer needs: arrays for FFCV's writer, PIL images for torchvision's transforms.

Photos are stored as they are shown: the EXIF orientation tag is applied (a portrait photo taken with
the camera turned is stored upright, not sideways). Every mode PIL opens becomes 8-bit RGB by its real
range, or is refused with a ValueError that says why (the FFCV writer then skips and lists the file):

- 8-bit modes (L, P, 1, RGB, CMYK, YCbCr, LAB, HSV, ...) through PIL's own conversion. Alpha (LA, PA,
  RGBA, a palette's transparency) is dropped, keeping the colors as stored, as torchvision's
  ImageFolder and timm load images, so every loader here sees the pixels those pipelines train on;
- 16-bit gray (I;16, I;16B, I;16L, I;16N, and mode I from PNG and PGM/PPM files, which hold at most
  16 bits, or from TIFF files of at most 16 bits per sample): v * 255 / 65535 (v * 255 / (2^b - 1)
  for a b-bit TIFF), rounded. PIL's own conversion clips instead, which turns most of them white;
- 32-bit float (F): pixels in [0, 1] (the convention of float images) times 255, rounded; floats
  outside [0, 1], and 32-bit integers, have no known range and are refused;
- anything PIL cannot convert to RGB (e.g. La) is refused.
"""
from __future__ import annotations

import os

import numpy as np
import torch

GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# Formats whose mode-I images hold at most 16 bits (PIL widens them to 32-bit ints, range kept).
_SIXTEEN_BIT_I_FORMATS = ("PNG", "PPM")


def _int_bits(image) -> int | None:
    """Bits per sample of a mode-I image, or None where its range is unknown."""
    if image.format in _SIXTEEN_BIT_I_FORMATS:
        return 16
    if image.format == "TIFF":
        bits = image.tag_v2.get(258)                  # BitsPerSample: one value, or one per sample
        bits = bits[0] if isinstance(bits, tuple) else bits
        return bits if isinstance(bits, int) and 1 <= bits <= 16 else None
    return None


def _gray_to_uint8(image) -> np.ndarray:
    """(H, W) uint8 from a 16-bit, 32-bit integer or float gray image (see the module docstring)."""
    values = np.asarray(image)
    if image.mode == "F":
        if not (np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1):
            raise ValueError("float pixels outside [0, 1]: no known range to map to 8 bits")
        top = 1.0
    else:
        bits = 16 if image.mode in GRAY16_MODES else _int_bits(image)
        if bits is None:
            raise ValueError(f"32-bit integer pixels ({image.format or 'in memory'}): no known range to map "
                             "to 8 bits; save the image with 8 or 16 bits")
        top = float((1 << bits) - 1)
        if values.min() < 0 or values.max() > top:
            raise ValueError(f"pixel values outside the {bits}-bit range [0, {top:.0f}]")
    return np.rint(values.astype(np.float64) * (255.0 / top)).astype(np.uint8)


def to_rgb_array(image) -> np.ndarray:
    """An opened PIL image of any mode -> (H, W, 3) uint8 C-contiguous RGB array.

    Raises ValueError for what cannot be converted faithfully (see the module docstring), and PIL's
    own errors (OSError etc.) for corrupt or truncated data. The EXIF orientation is not applied
    here (load_rgb does it): the image is converted as it is held.
    """
    if image.mode in GRAY16_MODES or image.mode in ("I", "F"):
        return np.repeat(_gray_to_uint8(image)[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file fully, upright as it is shown (EXIF orientation applied), to an (H, W, 3)
    uint8 RGB array.

    Raises OSError / PIL errors for unreadable, corrupt or truncated files and ValueError for images
    without a faithful 8-bit RGB form (see the module docstring).
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        # In place, so that the file's format and tags (read by _int_bits) stay with the image.
        ImageOps.exif_transpose(im, in_place=True)
        return to_rgb_array(im)


class Images(torch.utils.data.Dataset):
    """Indexed (image, int label) pairs from any source, with the image in one form.

    items: indexable, with a length; item i is (image, label), the image an (H, W, 3) uint8 array, a
    PIL image or an image file path (str or os.PathLike), the label anything int() takes. E.g. a scan's
    (path, label) samples, a torchvision data set, or list(zip(images, labels)) over arrays.
    form: "array" gives (H, W, 3) uint8 arrays (what FFCV's writer stores), "pil" RGB PIL images
    (what torchvision's transforms take); both through load_rgb / to_rgb_array.
    transform: applied to the image last, e.g. fallback.train_transform(224).
    Raises ValueError for another form, or for an array item that is not (H, W, 3) uint8.
    """

    def __init__(self, items, form: str = "array", transform=None):
        if form not in ("array", "pil"):
            raise ValueError(f"form must be 'array' or 'pil', got {form!r}")
        self.items, self.form, self.transform = items, form, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        image, label = self.items[i]
        if isinstance(image, (str, os.PathLike)):
            image = load_rgb(image)
        elif isinstance(image, Image.Image):
            image = to_rgb_array(image)
        elif not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                  and image.shape[2] == 3):
            raise ValueError(f"item {i}: expected a path, a PIL image or an (H, W, 3) uint8 array, got "
                             f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}")
        if self.form == "pil":
            image = Image.fromarray(image)
        return (image if self.transform is None else self.transform(image)), int(label)
