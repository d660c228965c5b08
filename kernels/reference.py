"""The specification: CRATE's MSSA attention and ISTA step exactly as the official ``model/crate.py``,
and CRATE-alpha's ODL block as its official torch port.

Every faster path in this package is tested against these functions (in float64 where the test needs a
truth). They are deliberately literal: same operations, same order, autograd backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mssa_attention_ref(w: torch.Tensor, scale: float | None = None, dropout_p: float = 0.0,
                       training: bool = False, causal: bool = False) -> torch.Tensor:
    """Tied q = k = v attention of one MSSA head group. w: (B, H, N, D) -> (B, H, N, D).

    causal: query i attends to keys j <= i, as crate-lm's square CRATE-GPT (crate.py) computes it: the
    scores above the diagonal filled with -inf before the softmax, then the full product attn @ w. (So a
    NaN or Inf in w at position k also reaches rows i < k, as 0 * NaN in that product, column-wise.)"""
    scale = w.shape[-1] ** -0.5 if scale is None else scale
    dots = torch.matmul(w, w.transpose(-1, -2)) * scale  # (B, H, N, N)
    if causal:
        N = w.shape[-2]
        above = torch.ones(N, N, dtype=torch.bool, device=w.device).triu_(1)      # (i, j) with j > i
        dots = dots.masked_fill(above, float("-inf"))
    attn = dots.softmax(dim=-1)
    attn = F.dropout(attn, dropout_p, training)
    return torch.matmul(attn, w)


def ista_step_ref(x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1,
                  lambd: float = 0.1) -> torch.Tensor:
    """One non-negative ISTA step, official 3-matmul form. x: (..., C), weight: (C, C) -> (..., C).

    relu(x + eta * (x W - x W^T W) - eta * lambda), computed as the official FeedForward does.
    """
    x1 = F.linear(x, weight)                  # x W^T
    grad_1 = F.linear(x1, weight.t())         # x W^T W
    grad_2 = F.linear(x, weight.t())          # x W
    grad_update = step_size * (grad_2 - grad_1) - step_size * lambd
    return F.relu(x + grad_update)


def odl_step_ref(x: torch.Tensor, D: torch.Tensor, D1: torch.Tensor, step_size: float = 0.1,
                 lambd: float = 0.1) -> torch.Tensor:
    """CRATE-alpha's overcomplete dictionary learning (ODL) block, as the official torch port's
    ``OvercompleteISTABlock`` (UCSC-VLAA/CRATE-alpha torch_inference/model/crate_alpha.py) computes it.

    x: (..., d); D, D1: (d, m) (m = 4d atoms in every preset) -> (..., d), autograd backward.
    Two non-negative ISTA steps from a zero code, then the decoupled synthesis dictionary D1:
        a1 = relu(eta x D - eta lambda)
        a2 = relu(a1 - eta (a1 D^T - x) D - eta lambda)
        out = a2 D1^T
    """
    return torch.matmul(odl_codes_ref(x, D, step_size, lambd), D1.t())


def odl_codes_ref(x: torch.Tensor, D: torch.Tensor, step_size: float = 0.1, lambd: float = 0.1) -> torch.Tensor:
    """The sparse codes a2 of odl_step_ref: x (..., d), D (d, m) -> (..., m), the port's operations in its
    order (a1 = relu(eta x D - eta lambda); a2 = relu(a1 - eta (a1 D^T - x) D - eta lambda))."""
    a1 = F.relu(step_size * torch.matmul(x, D) - step_size * lambd)
    lasso_grad = torch.matmul(torch.matmul(a1, D.t()) - x, D)
    return F.relu(a1 - step_size * lasso_grad - step_size * lambd)
