"""Fast PyTorch paths for MSSA and ISTA: exact CRATE math, fewer GEMMs, hand-written backward passes.

They run on any device and are the default off CUDA. Each has the same signature and semantics as
its twin in reference.py and is tested against it in float64.
"""
from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------------------------
# MSSA: tied q = k = v attention.  O = softmax(scale * w w^T) w
# Backward with P = softmax rows, delta = rowsum(dO * O):
#   dP = dO w^T ; dS = P * (dP - delta) ; dw = P^T dO + scale * (dS + dS^T) w
# Autograd of the reference needs 4 batched GEMMs; this needs 3 in fp32 and fewer N x N passes.
# (SDPA with q = k = v measured slower on CPU: 1.1x in fp32, 7x in bf16.)
# ---------------------------------------------------------------------------------------------------
class _TiedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: float) -> torch.Tensor:
        B, H, N, D = w.shape
        w3 = w.reshape(B * H, N, D)        # one copy of the strided head split, then plain bmm
        s = torch.baddbmm(w3.new_empty(B * H, N, N), w3, w3.transpose(1, 2), beta=0.0, alpha=scale)
        p = torch.softmax(s, dim=-1)                            # (BH, N, N)
        o = torch.bmm(p, w3)                                    # (BH, N, D)
        ctx.save_for_backward(w3, p, o)
        ctx.scale = scale
        return o.view(B, H, N, D)

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        w3, p, o = ctx.saved_tensors
        do3 = do.reshape(o.shape)
        delta = (do3 * o).sum(-1, keepdim=True)                 # rowsum(dP * P) == rowsum(dO * O)
        ds = torch.bmm(do3, w3.transpose(1, 2)).sub_(delta).mul_(p)   # dS, (BH, N, N)
        dw = torch.bmm(p.transpose(1, 2), do3)                  # dV
        # dQ + dK = scale (dS + dS^T) w. Measured on CPU: forming dS + dS^T first wins in fp32,
        # two transposed-operand GEMMs win in bf16/fp16 (the N x N transpose-add is then the cost).
        if ds.dtype == torch.float32 or ds.dtype == torch.float64:
            dw = torch.baddbmm(dw, ds + ds.transpose(1, 2), w3, alpha=ctx.scale)
        else:
            dw = torch.baddbmm(dw, ds, w3, alpha=ctx.scale)
            dw = torch.baddbmm(dw, ds.transpose(1, 2), w3, alpha=ctx.scale)
        return dw.view(do.shape), None


def mssa_attention_torch(w: torch.Tensor, scale: float) -> torch.Tensor:
    """w: (B, H, N, D) -> (B, H, N, D), tied q = k = v softmax attention with a 3-GEMM backward."""
    return _TiedAttention.apply(w, scale)


# ---------------------------------------------------------------------------------------------------
# ISTA in operator form. The official step  relu(x + eta (x W - x W^T W) - eta lambda)  is linear in x
# before the ReLU:  x W - x W^T W = x A  with the C x C operator  A = W - W^T W.  Forming A costs one
# C x C x C product per step; then every token row needs ONE (M x C) x (C x C) GEMM instead of the
# official three (or two for r = x - x W^T ; r W).  M = batch x tokens >> C, so this is the big saving.
#   forward   A = W - W^T W                    (in the weight's dtype, fp32 under autocast)
#             out = relu(x + eta x A - eta lambda)
#   backward  g = dout * (out > 0)
#             dx = g + eta g A^T               one GEMM
#             P = x^T g ; dW = eta (P - W (P + P^T))   one GEMM + one C^3
# 1 + 2 token GEMMs against 3 + 6 for autograd of the official form; exact in real arithmetic
# (float64 tests agree with the reference to ~1e-15).
# ---------------------------------------------------------------------------------------------------
def ista_operator(weight: torch.Tensor) -> torch.Tensor:
    """A = W - W^T W, the linear part of the ISTA step in row form (x W - x W^T W = x A)."""
    return torch.addmm(weight, weight.t(), weight, alpha=-1.0)


class _ISTAStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                               # (M, C)
        a = ista_operator(weight).to(x.dtype)                       # (C, C)
        out = torch.addmm(x2, x2, a, alpha=step_size)               # x + eta x A
        out = out.sub_(step_size * lambd).relu_()
        # out is the next layer's input, kept alive anyway: saving it costs no memory, and its
        # sign is the ReLU mask, so no pre-activation copy is stored.
        ctx.save_for_backward(x2, weight, a, out)
        ctx.step_size = step_size
        return out.view(shape)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        x2, weight, a, out = ctx.saved_tensors
        eta = ctx.step_size
        g = torch.where(out > 0, dout.reshape(out.shape), 0)        # (M, C)
        dx = torch.addmm(g, g, a.t(), alpha=eta)                    # g + eta g A^T
        dw = None
        if ctx.needs_input_grad[1]:
            p = torch.mm(x2.t(), g).to(weight.dtype)                # x^T g, (C, C)
            dw = torch.addmm(p, weight, p + p.t(), alpha=-1.0).mul_(eta)
        return dx.view(dout.shape), dw, None, None


def ista_step_torch(x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1,
                    lambd: float = 0.1) -> torch.Tensor:
    """x: (..., C), weight: (C, C) -> (..., C). Same function as ista_step_ref; computes in x's dtype,
    forms the C x C operator in the weight's dtype (fp32 master weights stay fp32 under autocast)."""
    return _ISTAStep.apply(x, weight, step_size, lambd)
