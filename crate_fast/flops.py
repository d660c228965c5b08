"""Matmul FLOP counts for MFU and roofline numbers (docs/DESIGN.md §6): each family declares its own count
beside its config (models/<family>.py ``flops``); this module finds it by config, and holds the GPU peaks
and a standard ViT for comparison.

A multiply-add is 2 FLOPs. Norms, softmax and elementwise work are not counted (they cost bandwidth,
not matrix FLOPs), as in every MFU convention. Training is 3x forward (backward = 2x forward).
"""
from __future__ import annotations

from .registry import family_of_config

# Dense bf16/fp16 tensor-core peak (FLOP/s) by GPU name substring, for MFU.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "GH200": 989.4e12, "A100": 312e12, "L40S": 362e12,
             "RTX 4090": 165.2e12}


def flops_per_sample(cfg, *, training: bool = False, **options) -> int:
    """FLOPs of one sample (an image; a sequence of block_size tokens for language models) through the
    model of `cfg`, forward or (training=True) forward + backward: its family's ``flops`` with `options`
    (image families: img_size=(h, w) instead of the config's; CRATE and CRATE-MAE: ista="2mm" | "3mm").
    Raises TypeError for a config of no registered family, ValueError for a bad option value."""
    return family_of_config(cfg).flops(cfg, training=training, **options)


def flops_per_image(cfg, *, ista: str | None = None, training: bool = False,
                    img_size: tuple[int, int] | None = None) -> int:
    """:func:`flops_per_sample` of an image model (a CRATE, CRATE-alpha, CRATE-MAE config ...): per layer,
    N tokens, width d, inner = heads x dim_head, MSSA 4 N d inner + 4 N^2 inner; CRATE's ISTA 4 N d^2
    (ista="2mm", the exact two-GEMM step every fast impl runs) or 6 N d^2 ("3mm", the official code's);
    CRATE-alpha's ODL 8 N d m; CRATE-MAE's decoder and pixel head; the patch embedding and classifier.
    Raises ValueError for an unknown ista form."""
    options = {"img_size": img_size} if img_size is not None else {}
    if ista is not None:
        options["ista"] = ista
    return flops_per_sample(cfg, training=training, **options)


def vit_flops_per_image(dim: int, depth: int, img: int = 224, patch: int = 16, classes: int = 1000,
                        mlp_ratio: float = 4.0, training: bool = False) -> int:
    """A standard ViT's matmul FLOPs per image (qkv + out projection, MLP, attention), for comparison."""
    P = (img // patch) ** 2
    N = P + 1
    layer = 2 * N * dim * 3 * dim + 2 * N * dim * dim + 2 * 2 * N * dim * int(mlp_ratio * dim) + 4 * N * N * dim
    fwd = 2 * P * 3 * patch * patch * dim + depth * layer + 2 * dim * classes
    return 3 * fwd if training else fwd


def peak_flops(device_name: str) -> float | None:
    """Dense 16-bit peak of a GPU by name (None if unknown)."""
    for key, value in PEAK_BF16.items():
        if key in device_name:
            return value
    return None
