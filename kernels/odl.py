"""CRATE-alpha's ODL block in Triton: its four GEMMs, each with the block's elementwise work fused into
the epilogue (gemm.py).

The math (torch_ops.py, docs/DESIGN.md §2.2), tokens as rows, x: (M, d), D and D1: (d, m), m = 4d:
    epilogue "a1"               a1  = relu(eta x D - eta lambda)
    epilogue "e"                e   = a1 D^T - x
    epilogue "a2"               a2  = relu(a1 - eta e D - eta lambda)
    epilogue "out[_residual]"   out = a2 D1^T (+ residual)          in the output dtype
Each intermediate is written once and read once, in the compute dtype: a1 and a2 (M x m), e (M x d);
the port's forward writes nine M x m tensors (each elementwise op its own). Forming e = a1 D^T - x in
the second epilogue (the port's own order) rather than keeping p = x D from the first keeps p out of
memory: the third epilogue reads a1 only.

The backward is torch_ops.odl_backward on cuBLAS, the torch path's own: it saves x_c, a1, e and a2 as
the kernels wrote them, or (recompute=True) x_c and e only, a fifth of the port's saved bytes,
recomputing a1 and a2 there with torch's GEMMs. (ista.py: a Triton GEMM with a ReLU gate fused into its
prologue measured 3x slower than where() + cuBLAS on an H100.)
"""
from __future__ import annotations

import torch

from ._triton import call, op_with_twin
from .gemm import gemm_epilogue
from .torch_ops import odl_backward, odl_operands, odl_setup_context


def _out_dtype(xc: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    """The residual's dtype promoted with the compute dtype, or the compute dtype without residual."""
    return xc.dtype if residual is None else torch.promote_types(residual.dtype, xc.dtype)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------
def _odl_forward(xc: torch.Tensor, dc: torch.Tensor, d1c: torch.Tensor, residual: torch.Tensor | None,
                 eta: float, lambd: float, recompute: bool,
                 traced: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """xc: (M, d); dc, d1c: (d, m), all contiguous in one compute dtype; residual: (M, d) contiguous in
    any kernel dtype, or None -> (out (M, d) in _out_dtype, a1 (M, m), e (M, d), a2 (M, m) in the compute
    dtype). recompute only tells the backward what to keep (torch_ops.odl_setup_context)."""
    def gemm(lhs, rhs, x, epilogue, out_dtype=xc.dtype):
        return gemm_epilogue(lhs, rhs, x, epilogue, eta, lambd, out_dtype, traced)

    a1 = gemm(xc, dc, None, "a1")
    e = gemm(a1, dc, xc, "e")
    a2 = gemm(e, dc, a1, "a2")
    out = gemm(a2, d1c, residual, "out" if residual is None else "out_residual", _out_dtype(xc, residual))
    return out, a1, e, a2


def _odl_fake(xc, dc, d1c, residual, eta, lambd, recompute):
    codes = xc.new_empty(xc.shape[0], dc.shape[1])
    return xc.new_empty(xc.shape, dtype=_out_dtype(xc, residual)), codes, torch.empty_like(xc), codes.clone()


# ------------------------------------------------------------------------------------------------
# torch.library op and its eager twin, both with torch_ops' autograd of the step (plain torch ops in
# the backward, so torch.compile can fuse them)
# ------------------------------------------------------------------------------------------------
odl_fwd, odl_fwd_twin = op_with_twin("crate_fast::odl_fwd", _odl_forward, fake=_odl_fake,
                                   setup_context=odl_setup_context, backward=odl_backward)


# ------------------------------------------------------------------------------------------------
# Entry point, for the inputs odl_step admitted: CUDA (or the interpreter), the compute and residual
# dtypes fp32/fp16/bf16, non-empty
# ------------------------------------------------------------------------------------------------
def odl_step_triton(x: torch.Tensor, D: torch.Tensor, D1: torch.Tensor, step_size: float, lambd: float,
                    residual: torch.Tensor | None, compute_dtype: torch.dtype, recompute: bool = False) -> torch.Tensor:
    """x: (..., d); D, D1: (d, m); residual: x's shape or None -> (..., d) (odl_step_torch's dtypes);
    the GEMMs run in compute_dtype; recompute as odl_step_torch's."""
    with torch.autocast(x.device.type, enabled=False):      # the operands are cast as autocast would
        operands = odl_operands(x, D, D1, residual, compute_dtype)     # the kernels read whole rows
        out, *_ = call(odl_fwd, odl_fwd_twin, *operands, step_size, lambd, recompute)
    return out.view(x.shape)
