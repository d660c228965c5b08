"""Per-layer white-box statistics of a CRATE-family model: coding rate (compression) and sparsity.

For layer l (an encoder layer of CRATE-MAE), with z the layer's input tokens and w_k = LN1(z) U_k the head-k
subspace coordinates:
  R^c  = 1/2 sum_k logdet(I_n + p / (n eps) Y_k Y_k^T),  Y_k = w_k with every token unit-normalized
         (the official vis_utils/coding_rate.py; eps = 0.01, n tokens including CLS, p = head dim);
  R    = 1/2 logdet(I_n + d / (n eps) Z Z^T),  Z = LN1(z) tokens unit-normalized: the expansion term of
         the rate-reduction objective (the official code never shipped it);
  sparsity = fraction of exact zeros of the layer's sparse codes: the ISTA output (n x d per image) for
         CRATE and CRATE-MAE's encoder, the ODL codes a2 of LN2(z_half) (n x 4d) for CRATE-alpha, whose
         block output adds a residual and is dense (tokens.py); l0 = 1 - sparsity.
Each is computed per image in fp32, then averaged over the batch (mean and std). logdet(I + c Y Y^T)
is evaluated on the smaller Gram matrix (Sylvester's identity), via Cholesky.
"""
from __future__ import annotations

import torch
from torch import nn

from .tokens import check_pos_interp, embed_tokens, float_model

EPS = 0.01


def _logdet_identity_plus(y: torch.Tensor, c: float) -> torch.Tensor:
    """logdet(I + c y y^T) for y (..., n, p), on the smaller of the n x n / p x p Gram matrices."""
    n, p = y.shape[-2:]
    gram = y.transpose(-1, -2) @ y if p < n else y @ y.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(eye + c * gram)
    return 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)


def coding_rate(w: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """R^c per image: 1/2 sum_k logdet(I_n + p / (n eps) Y_k Y_k^T), Y_k = w_k with unit-norm rows.

    w: (B, heads, n, p) float subspace coordinates (MSSA.project) -> (B,) in w's dtype. Raises
    torch.linalg.LinAlgError when a token is zero or not finite (its unit normalization is NaN and the
    Cholesky factorization fails). Source: Ma-Lab-Berkeley/CRATE vis_utils/coding_rate.py (eps = 0.01)."""
    y = w / w.norm(dim=-1, keepdim=True)
    n, p = y.shape[-2:]
    return 0.5 * _logdet_identity_plus(y, p / (n * eps)).sum(-1)


def expansion_rate(z: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """R per image: 1/2 logdet(I_n + d / (n eps) Z Z^T), Z = z with unit-norm rows.

    z: (B, n, d) float tokens -> (B,) in z's dtype; errors as coding_rate. Source: the expansion term
    of the rate-reduction objective (Yu et al., NeurIPS 2023), which the official code never shipped,
    with coding_rate.py's normalization and eps."""
    y = z / z.norm(dim=-1, keepdim=True)
    n, d = y.shape[-2:]
    return 0.5 * _logdet_identity_plus(y, d / (n * eps))


def zero_fraction(x: torch.Tensor) -> torch.Tensor:
    """Fraction of exact zeros per image. x: (B, ...) any dtype -> (B,) fp32.

    Source: Ma-Lab-Berkeley/CRATE vis_utils/plot.py `cal_sparsity` (count of zeros / (n * d))."""
    return (x == 0).flatten(1).float().mean(1)


@torch.no_grad()
def layer_stats(model: nn.Module, images: torch.Tensor, eps: float = EPS, pos_interp: str = "dino") -> list[dict]:
    """One dict per layer (CRATE-MAE: per encoder layer): coding_rate, coding_rate_std, expansion_rate,
    expansion_rate_std, sparsity, sparsity_std, l0, l0_std (means and stds over the batch, Python floats),
    computed in fp32.

    model: CRATE, CRATE-alpha or CRATE-MAE (its encoder on the whole image, mask ratio 0: the tokens
    forward_features sees), or CRATE-GPT (its causal layers on a text). sparsity counts the zeros of the
    ISTA output (CRATE, CRATE-MAE, square CRATE-GPT) or of the sparse codes a2 (CRATE-alpha's ODL,
    overcomplete CRATE-GPT); see the module docstring.
    images: (B, C, H, W) float, H and W divisible by the patch, or a language model's (B, T) token ids
    (every position's token counts, T of them); off the training grid the position table
    is resized by `pos_interp` ("dino", the CRATE notebooks' way and CRATE-MAE's forward_features, or
    "size", the classifiers' forward). The layers run exactly as their blocks' forward does, step by
    step: no hooks are registered, so nothing lingers on the model after the call; a 16-bit model is
    copied to fp32; the mode is restored.
    Raises ValueError for a bad image size or pos_interp, TypeError for another kind of model. Source:
    Ma-Lab-Berkeley/CRATE vis_utils/crate_hook.py (R^c of each layer's qkv output, sparsity of each ISTA
    output)."""
    check_pos_interp(pos_interp)
    model = float_model(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.autocast(device.type, enabled=False):
            inputs = images.to(device) if not images.is_floating_point() else images.to(device, torch.float32)
            x = embed_tokens(model, inputs, pos_interp)
            out = []
            for blk in model.blocks:
                zn = blk.norm1(x)
                rc = coding_rate(blk.attn.project(zn), eps)
                r = expansion_rate(zn, eps)
                x, codes = blk.sparsify(blk.compress(x))
                zf = zero_fraction(codes)
                out.append({name: float(v) for name, v in [
                    ("coding_rate", rc.mean()), ("coding_rate_std", _std(rc)),
                    ("expansion_rate", r.mean()), ("expansion_rate_std", _std(r)),
                    ("sparsity", zf.mean()), ("sparsity_std", _std(zf)),
                    ("l0", (1 - zf).mean()), ("l0_std", _std(1 - zf))]})
        return out
    finally:
        model.train(was_training)


def _std(v: torch.Tensor) -> torch.Tensor:
    return v.std() if v.numel() > 1 else torch.zeros(())
