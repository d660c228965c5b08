"""Where a CRATE-family model looks: the CLS token's attention per head, DINO-style masks, the features the
PCA reads. Every image family: CRATE and CRATE-alpha, and CRATE-MAE's encoder on the whole image (mask
ratio 0; tokens.py says which tokens each family's blocks see); for CRATE-GPT the causal attention of
every position of a text (token_attention).

Sources of the formulas (docs cite them by repository and file):
  attention maps   DINO's `get_last_selfattention` + `attentions[0, :, 0, 1:]` (facebookresearch/dino,
                   vision_transformer.py and visualize_attention.py); the CRATE notebooks' twin is
                   `CRATE.get_last_selfattention(img, layer)` (LeslieTrue/crate-emergence-notebooks, crate.py)
  positions        off the training grid, the table is resized with DINO's interpolate_pos_encoding, as the
                   notebooks do (`pos_interp="dino"`, see crate_fast.layers.resample_pos_embed); CRATE-MAE's
                   fixed sin-cos table too, as its forward_features and the official crate_ae.py
                   interpolate_pos_encoding do
  masks            DINO's visualize_attention.py: sort, cumulative sum, keep the mass above 1 - tau
  features         the notebooks' 'key' facet: qkv(LN1(z)) of the patch tokens (crate.py `get_last_key`)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .tokens import check_model, check_pos_interp, embed_tokens, float_model


def check_layer(model: nn.Module, layer: int) -> int:
    """`layer` as a block index in 0..depth-1. Accepts 0..depth-1 and, Python-style, -depth..-1.

    Raises TypeError for a non-integer or another kind of model, ValueError for an index outside the model's
    depth (CRATE-MAE: its encoder's)."""
    check_model(model)
    depth = len(model.blocks)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an int, got {layer!r}")
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} is out of range: the model has {depth} layers "
                         f"(0..{depth - 1}, or -{depth}..-1 from the end)")
    return layer % depth


def check_heads(model: nn.Module, heads: Sequence[int] | None) -> list[int]:
    """`heads` as a list of distinct head indices in 0..heads-1 (every head when None), in the order given.

    Accepts 0..heads-1 and -heads..-1. Raises TypeError for non-integers, ValueError for an empty list, a
    repeated head, or an index outside the model's heads; TypeError for another kind of model."""
    check_model(model)
    n = model.blocks[0].attn.heads
    if heads is None:
        return list(range(n))
    heads = list(heads)
    if not heads:
        raise ValueError("heads is empty: give at least one head, or None for all")
    for h in heads:
        if isinstance(h, bool) or not isinstance(h, int):
            raise TypeError(f"heads must be ints, got {h!r}")
    bad = [h for h in heads if not -n <= h < n]
    if bad:
        raise ValueError(f"head(s) {bad} out of range: the model has {n} heads (0..{n - 1})")
    resolved = [h % n for h in heads]
    if len(set(resolved)) != len(resolved):
        raise ValueError(f"heads {heads} name a head more than once")
    return resolved


@torch.no_grad()
def _layer_input(model: nn.Module, images: torch.Tensor, layer: int, pos_interp: str):
    """(block `layer`, LN1 of its input tokens, patch grid), in fp32, with the model's mode restored."""
    check_model(model, "images")
    layer = check_layer(model, layer)
    check_pos_interp(pos_interp)
    model = float_model(model)
    device = next(model.parameters()).device
    images = images.to(device, torch.float32)
    grid = model.patch_embed.grid(images)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(device.type, enabled=False):
            x = embed_tokens(model, images, pos_interp)
            for blk in model.blocks[:layer]:
                x = blk(x)
            blk = model.blocks[layer]
            return blk, blk.norm1(x), grid
    finally:
        model.train(was_training)


@torch.no_grad()
def token_attention(model: nn.Module, idx: torch.Tensor, layer: int = -1,
                    heads: Sequence[int] | None = None) -> torch.Tensor:
    """A language model's causal attention at block `layer`: softmax(w w^T * scale) under the causal mask,
    for every query position (rows) over the keys (columns) of a text.

    model: CRATE-GPT; idx: (B, T) token ids, T <= block_size; layer / heads as attention_maps'.
    Returns (B, len(heads), T, T) fp32, each row summing to 1 over the positions up to its own. The model
    runs in fp32 in eval mode (a 16-bit model is copied) and its mode is restored. Raises TypeError for
    another kind of model, ValueError for a bad layer, head or text."""
    check_model(model, "tokens")
    layer, heads = check_layer(model, layer), check_heads(model, heads)
    model = float_model(model)
    was_training = model.training
    model.eval()
    try:
        with torch.autocast(idx.device.type, enabled=False):
            x = embed_tokens(model, idx.to(next(model.parameters()).device))
            for blk in model.blocks[:layer]:
                x = blk(x)
            blk = model.blocks[layer]
            return blk.attn.attention_probs(blk.norm1(x), is_causal=True)[:, heads]
    finally:
        model.train(was_training)


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, layer: int = -1, heads: Sequence[int] | None = None,
                   pos_interp: str = "dino") -> torch.Tensor:
    """The CLS row of each head's softmax(w w^T * scale) at block `layer`, on the patch grid.

    model: CRATE, CRATE-alpha or CRATE-MAE (its encoder: `layer` counts encoder blocks).
    images: (B, C, H, W) float, H and W divisible by the patch (any size: off the training grid the position
    table is resized by `pos_interp`, "dino" (default: DINO's interpolate_pos_encoding, what the CRATE
    notebooks and CRATE-MAE's forward_features use) or "size" (what the classifiers' forward uses)).
    layer: 0..depth-1 or -depth..-1. heads: head indices to keep, in that order (None: all).
    Returns (B, len(heads), H / patch, W / patch) fp32; each full map sums to 1 - (CLS self-attention).
    The model runs in fp32 in eval mode (a 16-bit model is copied), and its mode is restored.
    Raises ValueError / TypeError for a bad layer, head, pos_interp or image size, TypeError for another
    kind of model.
    Source: DINO visualize_attention.py `attentions[0, :, 0, 1:]` (facebookresearch/dino); CRATE's
    `get_last_selfattention(img, layer)` (LeslieTrue/crate-emergence-notebooks, crate.py)."""
    heads = check_heads(model, heads)
    blk, xn, (gh, gw) = _layer_input(model, images, layer, pos_interp)
    probs = blk.attn.attention_probs(xn)                                       # (B, H, N, N)
    return probs[:, heads, 0, 1:].reshape(images.shape[0], len(heads), gh, gw)


def threshold_masks(maps: torch.Tensor, tau: float = 0.6) -> torch.Tensor:
    """DINO's masks: per map, the smallest set of patches holding a fraction tau of the attention mass.

    maps: (..., h, w) non-negative float -> bool (..., h, w). Each map is renormalized to sum 1, sorted
    ascending, and a patch is kept where the cumulative sum exceeds 1 - tau.
    Raises ValueError unless 0 < tau <= 1.
    Source: facebookresearch/dino visualize_attention.py (`th_attn = cumval > (1 - args.threshold)`)."""
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    flat = maps.flatten(-2)
    flat = flat / flat.sum(-1, keepdim=True)
    vals, idx = flat.sort(dim=-1)                       # ascending
    keep_sorted = vals.cumsum(-1) > 1 - tau
    keep = torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)
    return keep.view(maps.shape)


@torch.no_grad()
def patch_features(model: nn.Module, images: torch.Tensor, layer: int = -1, pos_interp: str = "dino") -> torch.Tensor:
    """The subspace features w = LN1(z) U (q = k = v) of the patch tokens at block `layer`, heads concatenated.

    images: (B, C, H, W) as for attention_maps (same `layer` and `pos_interp` rules).
    Returns (B, H / patch, W / patch, heads * dim_head) fp32, CLS dropped.
    Source: the facet the CRATE authors' PCA reads, `attn(x, return_key=True)` = qkv(LN(x))
    (LeslieTrue/crate-emergence-notebooks crate.py `get_last_key`; pca_visualization.py, facet 'key')."""
    blk, xn, (gh, gw) = _layer_input(model, images, layer, pos_interp)
    return blk.attn.qkv(xn)[:, 1:].reshape(images.shape[0], gh, gw, -1)      # CLS dropped
