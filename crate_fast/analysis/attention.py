"""Where CRATE looks: the CLS token's attention per head, DINO-style masks, PCA of patch features."""
from __future__ import annotations

import torch

from ..models.crate import CRATE
from .stats import _float_model


@torch.no_grad()
def _layer_input(model: CRATE, images: torch.Tensor, layer: int):
    """(block `layer`, LN1 of its input tokens, patch grid), in fp32, with the model's mode restored."""
    model = _float_model(model)
    layer = layer % len(model.blocks)
    device = next(model.parameters()).device
    images = images.to(device, torch.float32)
    grid = model.patch_embed.grid(images)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            x = model.embed(images)
            for blk in model.blocks[:layer]:
                x = blk(x)
            blk = model.blocks[layer]
            return blk, blk.norm1(x), grid
    finally:
        model.train(was_training)


@torch.no_grad()
def attention_maps(model: CRATE, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """The CLS row of each head's softmax(w w^T * scale) at `layer`, on the patch grid.

    images: (B, C, H, W), any size divisible by the patch (position embeddings are interpolated).
    Returns (B, heads, H / patch, W / patch), fp32; each map sums to 1 - (CLS self-attention)."""
    blk, xn, (gh, gw) = _layer_input(model, images, layer)
    probs = blk.attn.attention_probs(xn)                                       # (B, H, N, N)
    return probs[:, :, 0, 1:].reshape(images.shape[0], -1, gh, gw)


def threshold_masks(maps: torch.Tensor, tau: float = 0.6) -> torch.Tensor:
    """DINO's masks: per map, the smallest set of patches holding a fraction tau of the attention mass.

    maps: (..., h, w) -> bool masks of the same shape."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    flat = maps.flatten(-2)
    flat = flat / flat.sum(-1, keepdim=True)
    vals, idx = flat.sort(dim=-1)                       # ascending
    keep_sorted = vals.cumsum(-1) > 1 - tau
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    return keep.view(maps.shape)


@torch.no_grad()
def patch_features(model: CRATE, images: torch.Tensor, layer: int = -1) -> torch.Tensor:
    """The q = k = v subspace features w = LN1(z) U of the patch tokens at `layer` (heads concatenated),
    the facet the CRATE authors' PCA uses. Returns (B, h, w, heads * dim_head)."""
    blk, xn, (gh, gw) = _layer_input(model, images, layer)
    return blk.attn.qkv(xn)[:, 1:].reshape(images.shape[0], gh, gw, -1)      # CLS dropped


def pca_rgb(features: torch.Tensor) -> torch.Tensor:
    """First three principal components of patch features, fitted jointly over the batch, each
    min-max scaled per image to [0, 1]. features: (B, h, w, C) -> (B, h, w, 3)."""
    B, h, w, C = features.shape
    x = features.reshape(-1, C).double()
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    comps = (x @ v[:3].T).reshape(B, h * w, 3)
    lo, hi = comps.min(1, keepdim=True).values, comps.max(1, keepdim=True).values
    return ((comps - lo) / (hi - lo).clamp_min(1e-12)).reshape(B, h, w, 3).float()
