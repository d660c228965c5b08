"""The specification: CRATE's MSSA attention and ISTA step exactly as the official ``model/crate.py``.

Every faster path in this package is tested against these two functions (in float64 where the test
needs a truth). They are deliberately literal: same operations, same order, autograd backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mssa_attention_ref(w: torch.Tensor, scale: float | None = None, dropout_p: float = 0.0,
                       training: bool = False) -> torch.Tensor:
    """Tied q = k = v attention of one MSSA head group. w: (B, H, N, D) -> (B, H, N, D)."""
    scale = w.shape[-1] ** -0.5 if scale is None else scale
    dots = torch.matmul(w, w.transpose(-1, -2)) * scale  # (B, H, N, N)
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
