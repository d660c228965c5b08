"""Fused ISTA step for CRATE in Triton: the token GEMM with the residual, shift and ReLU in its epilogue.

Operator form (torch_ops.py): x W - x W^T W = x A with A = W - W^T W (C x C, formed by cuBLAS in the
weight's dtype; autograd turns dA into dW). With tokens as rows, x: (M, C):
    forward   out = relu(x + eta x_c A_c - eta lambda)    gemm.py, epilogue "ista"
    backward  g = dout * (out > 0); dx_c = eta g A^T; dA = eta x_c^T g     cuBLAS + one elementwise pass
The forward writes `out` once, in x's dtype (fp32 under autocast, like the official code's residual),
reading x_c (16-bit) for the GEMM and x for the epilogue: no pre-activation is stored.

The backward stays on cuBLAS on purpose: a Triton GEMM with the ReLU gate fused into its prologue
(LHS operand through registers) measured 3x slower than where() + cuBLAS on an H100 (bench/results).
"""
from __future__ import annotations

import torch

from ._triton import call, op_with_twin
from .gemm import gemm_epilogue
from .torch_ops import ista_apply_backward, ista_apply_setup_context, ista_operands


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------
def _ista_forward(x: torch.Tensor, xc: torch.Tensor | None, a: torch.Tensor, eta: float, lambd: float,
                  traced: bool = False) -> torch.Tensor:
    """x: (M, C) contiguous, the residual; xc: x in a's dtype, contiguous (None: x is); a: the operator
    A_c (C, C) -> (M, C) in x's dtype."""
    xc = x if xc is None else xc
    # ista_operands forms A_c contiguous; .contiguous() covers other callers of the registered op.
    return gemm_epilogue(xc, a.contiguous(), x, "ista", eta, lambd, out_dtype=x.dtype, traced=traced)


# ------------------------------------------------------------------------------------------------
# torch.library op and its eager twin, both with torch_ops' autograd of the apply step (plain torch ops
# in the backward, so torch.compile can fuse them)
# ------------------------------------------------------------------------------------------------
ista_apply, ista_apply_twin = op_with_twin(
    "crate_fast::ista_apply", _ista_forward, fake=lambda x, xc, a, eta, lambd: torch.empty_like(x),
    setup_context=ista_apply_setup_context, backward=ista_apply_backward)


# ------------------------------------------------------------------------------------------------
# Entry point, for the inputs ista_step admitted: CUDA (or the interpreter), x and the compute dtype
# fp32/fp16/bf16, non-empty
# ------------------------------------------------------------------------------------------------
def ista_step_triton(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """x: (..., C), weight: (C, C) -> (..., C) in x's dtype; the GEMM runs in compute_dtype."""
    with torch.autocast(x.device.type, enabled=False):      # the operands are cast as autocast would
        x2, xc, a = ista_operands(x.contiguous(), weight, compute_dtype)    # the kernel reads whole rows
        out = call(ista_apply, ista_apply_twin, x2, xc, a, step_size, lambd)
    return out.view(x.shape)
