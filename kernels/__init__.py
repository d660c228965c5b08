"""CRATE's two operators, each with three implementations behind one dispatching function.

- ``mssa_attention(w, scale=None, impl="auto")``: tied q = k = v softmax attention, (B, H, N, D).
- ``ista_step(x, weight, step_size=0.1, lambd=0.1, impl="auto")``: one non-negative ISTA step, (..., C).

impl: "reference" (literal official math, autograd), "torch" (fast PyTorch with hand-written
backward, any device), "triton" (fused kernels; CUDA, or CPU under TRITON_INTERPRET=1), "auto"
(triton for CUDA inputs the kernels take, torch otherwise). Under torch.autocast the matrix work runs
in the autocast dtype, as F.linear's would; ISTA's residual and output keep the input's dtype.
"""
from __future__ import annotations

import torch

from ._utils import autocast_cast, autocast_dtype, resolve_impl
from .reference import ista_step_ref, mssa_attention_ref
from .torch_ops import ista_step_torch, mssa_attention_torch

__all__ = ["mssa_attention", "ista_step", "mssa_attention_ref", "ista_step_ref"]


def mssa_attention(w: torch.Tensor, scale: float | None = None, impl: str = "auto") -> torch.Tensor:
    """softmax(scale * w w^T) w per head. w: (B, H, N, D) -> (B, H, N, D); scale defaults to D^-1/2."""
    if w.dim() != 4:
        raise ValueError(f"w must be (B, H, N, D), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    scale = w.shape[-1] ** -0.5 if scale is None else float(scale)
    impl = resolve_impl(impl, w)
    if impl == "reference":
        return mssa_attention_ref(w, scale)
    (w,) = autocast_cast(w)
    if impl == "auto":
        from . import mssa

        impl = "torch" if mssa.unsupported(w) else "triton"
    if impl == "torch":
        return mssa_attention_torch(w, scale)
    from .mssa import mssa_attention_triton

    return mssa_attention_triton(w, scale)


def ista_step(x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1, lambd: float = 0.1,
              impl: str = "auto") -> torch.Tensor:
    """relu(x + eta (x W - x W^T W) - eta lambda). x: (..., C), weight: (C, C) -> (..., C).

    The output has x's dtype. Under torch.autocast the GEMM operands run in the autocast dtype while
    the residual x and the output keep x's dtype (fp32), as autocast runs the official code."""
    c = x.shape[-1]
    if weight.shape != (c, c):
        raise ValueError(f"weight must be ({c}, {c}) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    impl = resolve_impl(impl, x)
    if impl == "reference":
        return ista_step_ref(x, weight, step_size, lambd)
    compute_dtype = autocast_dtype(x) or x.dtype
    if impl == "auto":
        supported = compute_dtype in (torch.float32, torch.float16, torch.bfloat16) and x.numel() > 0
        impl = "triton" if supported else "torch"
    if impl == "torch":
        return ista_step_torch(x, weight, float(step_size), float(lambd), compute_dtype)
    from .ista import ista_step_triton

    return ista_step_triton(x, weight, float(step_size), float(lambd), compute_dtype)
