"""Exact matmul FLOP counts of the CRATE family per image, for MFU and roofline numbers (docs/DESIGN.md §6).

A multiply-add is 2 FLOPs. Norms, softmax and elementwise work are not counted (they cost bandwidth,
not matrix FLOPs), as in every MFU convention. Training is 3x forward (backward = 2x forward).
"""
from __future__ import annotations

# Dense bf16/fp16 tensor-core peak (FLOP/s) by GPU name substring, for MFU.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "GH200": 989.4e12, "A100": 312e12, "L40S": 362e12,
             "RTX 4090": 165.2e12}


def flops_per_image(cfg, *, ista: str = "2mm", training: bool = False,
                    img_size: tuple[int, int] | None = None) -> int:
    """FLOPs of one image through the model of `cfg` (a CRATEConfig, CRATEAlphaConfig or CRATEMAEConfig).

    Per layer, N tokens, width d, inner = heads x dim_head (docs/DESIGN.md §6):
      MSSA           U and output projections 2 x 2 N d inner, attention (w w^T, P w) 4 N^2 inner
      CRATE ISTA     ista="2mm": 4 N d^2, the exact two-GEMM step (the model's real arithmetic; use it for
                     MFU of every impl); "3mm": 6 N d^2, the official code's three GEMMs (impl="reference")
      CRATE-alpha    ODL, four N x d x m GEMMs (m = ratio x d atoms): 8 N d m
      CRATE-MAE      encoder layers as CRATE's on all N = patches + 1 tokens (mask tokens included);
                     decoder layers W_dec 2 N d^2 + MSSA; decoder_pred 2 N d (3 p^2)
    plus the patch embedding 2 P (C p^2) d and the classifier 2 d classes. Training = 3 x forward.
    Raises ValueError for an unknown ista form.
    """
    from .models.crate_alpha import CRATEAlphaConfig

    if ista not in ("2mm", "3mm"):
        raise ValueError(f"ista must be '2mm' or '3mm', got {ista!r}")
    h, w = img_size or cfg.img_size
    P = (h // cfg.patch_size[0]) * (w // cfg.patch_size[1])
    N, d, inner = P + 1, cfg.dim, cfg.heads * cfg.dim_head
    patch = 2 * P * cfg.in_chans * cfg.patch_size[0] * cfg.patch_size[1] * d
    mssa = 2 * N * d * inner + 2 * N * inner * d + 4 * N * N * inner
    ista_f = (4 if ista == "2mm" else 6) * N * d * d
    if isinstance(cfg, CRATEAlphaConfig):
        fwd = patch + cfg.depth * (mssa + 8 * N * d * cfg.overcomplete_ratio * d) + 2 * d * cfg.num_classes
    elif hasattr(cfg, "decoder_depth"):           # CRATE-MAE
        pred = 2 * N * d * cfg.in_chans * cfg.patch_size[0] * cfg.patch_size[1]
        fwd = patch + cfg.depth * (mssa + ista_f) + cfg.decoder_depth * (2 * N * d * d + mssa) + pred
    else:
        fwd = patch + cfg.depth * (mssa + ista_f) + 2 * d * cfg.num_classes
    return 3 * fwd if training else fwd


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
