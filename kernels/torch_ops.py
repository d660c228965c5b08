"""Fast PyTorch paths for MSSA and ISTA: exact CRATE math, fewer GEMMs, hand-written backward passes.

They run on any device and are the default off CUDA. Each has the same signature and semantics as
its twin in reference.py and is tested against it in float64.
"""
from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------------------------
# MSSA: tied q = k = v attention.  O = softmax(scale * w w^T) w
# Backward with P = softmax rows:
#   dP = dO w^T ; dS = P * (dP - rowsum(dP * P)) ; dw = P^T dO + scale * (dS + dS^T) w
# Autograd of the reference needs 4 batched GEMMs; this needs 3 in fp32 and fewer N x N passes.
# (SDPA with q = k = v measured slower on CPU: 1.1x in fp32, 7x in bf16.)
# ---------------------------------------------------------------------------------------------------
class _TiedAttention(torch.autograd.Function):
    # Runs with autocast off (its inputs arrive already cast). softmax and its backward are the fused
    # ATen kernels, which accumulate in fp32 for 16-bit inputs; dS = P * (dP - rowsum(dP * P)) is then
    # formed from the very tiles it subtracts (the diagonal of tied attention cancels there).
    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: float) -> torch.Tensor:
        B, H, N, D = w.shape
        with torch.autocast(w.device.type, enabled=False):
            w3 = w.reshape(B * H, N, D)        # one copy of the strided head split, then plain bmm
            s = torch.baddbmm(w3.new_empty(B * H, N, N), w3, w3.transpose(1, 2), beta=0.0, alpha=scale)
            p = torch.softmax(s, dim=-1)                                      # (BH, N, N)
            o = torch.bmm(p, w3)                                              # (BH, N, D)
        ctx.save_for_backward(w3, p)
        ctx.scale = scale
        return o.view(B, H, N, D)

    @staticmethod
    def backward(ctx, do: torch.Tensor):
        w3, p = ctx.saved_tensors
        with torch.autocast(do.device.type, enabled=False):
            do3 = do.reshape(w3.shape).to(w3.dtype)
            dp = torch.bmm(do3, w3.transpose(1, 2))                           # dP = dO w^T
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)    # dS = P (dP - rowsum(dP P))
            dw = torch.bmm(p.transpose(1, 2), do3)                            # dV
            # dQ + dK = scale (dS + dS^T) w. Measured on CPU: forming dS + dS^T first wins in fp32,
            # two transposed-operand GEMMs win in bf16/fp16 (the N x N transpose-add is then the cost).
            if ds.dtype in (torch.float32, torch.float64):
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
#   A = W - W^T W                         plain autograd ops, in the weight's dtype (fp32 masters)
#   out = relu(x + eta x_c A_c - eta lam)  x_c, A_c: x and A in the compute dtype (bf16 under autocast)
#   backward of the apply step, g = dout * (out > 0):
#     dx = g (the residual) ; dx_c = eta g_c A_c^T ; dA_c = eta x_c^T g_c
#   and autograd turns dA into dW = dA - W (dA + dA^T) through the two C x C products.
# 1 + 2 token GEMMs against 3 + 6 for autograd of the official form; exact in real arithmetic
# (float64 tests agree with the reference to ~1e-15).
# Under autocast the residual x and the output keep x's dtype (fp32), exactly as autocast runs the
# official code (its elementwise x + update is fp32): only the GEMM operands are 16-bit.
# Non-finite values: a NaN in x or W, or a row of x that is all +-Inf, lands where the reference puts
# it, in the output and both gradients. A lone Inf in x, or an Inf in W, meets Infs of the other sign
# in other products here (x (W - W^T W)) than in the reference (x W - (x W^T) W), so there NaN and
# +-Inf can trade places (ista.py's kernel gives exactly this path's pattern).
# ---------------------------------------------------------------------------------------------------
def ista_operator(weight: torch.Tensor) -> torch.Tensor:
    """A = W - W^T W, the linear part of the ISTA step in row form (x W - x W^T W = x A)."""
    return torch.addmm(weight, weight.t(), weight, alpha=-1.0)


def ista_operands(x: torch.Tensor, weight: torch.Tensor, compute_dtype: torch.dtype):
    """The apply step's inputs, for autocast off: x as rows (M, C); x in the compute dtype (None when x
    already is); A_c = A in the compute dtype (C, C), formed in the weight's dtype, through autograd."""
    x2 = x.reshape(-1, x.shape[-1])
    xc = None if compute_dtype == x.dtype else x2.to(compute_dtype)
    return x2, xc, ista_operator(weight).to(compute_dtype)


def ista_apply_forward(x: torch.Tensor, xc: torch.Tensor | None, a: torch.Tensor, step_size: float,
                       lambd: float) -> torch.Tensor:
    """relu(x + eta xc a - eta lambda) for 2-D x (M, C); xc is x in a's dtype, or None if x already is.
    NaN propagates through relu_ (as through the reference's F.relu)."""
    if xc is None:
        out = torch.addmm(x, x, a, alpha=step_size)              # residual rides in the GEMM epilogue
    else:
        out = torch.add(x, torch.mm(xc, a), alpha=step_size)     # 16-bit GEMM, residual in x's dtype
    return out.sub_(step_size * lambd).relu_()


# The autograd of the apply step, shared by _ISTAApply here and by ista.py's op and its eager twin.
def ista_apply_setup_context(ctx, inputs, output):
    x, xc, a, step_size, _ = inputs
    # out is the next layer's input, kept alive anyway: saving it costs no memory, and its sign is the
    # ReLU mask, so no pre-activation copy is stored.
    ctx.save_for_backward(x if xc is None else xc, a, output)
    ctx.step_size, ctx.separate = step_size, xc is not None


def ista_apply_backward(ctx, dout: torch.Tensor):
    """Gradients w.r.t. (x, xc, a, step_size, lambd); xg is the GEMM operand (xc, or x)."""
    xg, a, out = ctx.saved_tensors
    # dout where out > 0, else 0: relu's own backward, so a NaN output passes dout on as the reference's does.
    g = torch.ops.aten.threshold_backward(dout, out, 0)
    gc = g.to(a.dtype)
    da = torch.mm(xg.t(), gc).mul_(ctx.step_size)
    if ctx.separate:
        return g, torch.mm(gc, a.t()).mul_(ctx.step_size), da, None, None
    return torch.addmm(g, gc, a.t(), alpha=ctx.step_size), None, da, None, None


class _ISTAApply(torch.autograd.Function):
    # forward(ctx, ...) calls the shared setup itself: a Function with a separate setup_context binds
    # its arguments through inspect.signature on every call (measured ~30 us of host time per call).
    @staticmethod
    def forward(ctx, x, xc, a, step_size, lambd):
        out = ista_apply_forward(x, xc, a, step_size, lambd)
        ista_apply_setup_context(ctx, (x, xc, a, step_size, lambd), out)
        return out

    backward = staticmethod(ista_apply_backward)


def ista_step_torch(x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1, lambd: float = 0.1,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x: (..., C), weight: (C, C) -> (..., C) in x's dtype; the same function as ista_step_ref.
    GEMMs run in compute_dtype (default x's dtype); the operator is formed in the weight's dtype."""
    with torch.autocast(x.device.type, enabled=False):      # the operands are cast as autocast would
        x2, xc, a = ista_operands(x, weight, compute_dtype or x.dtype)
        return _ISTAApply.apply(x2, xc, a, step_size, lambd).view(x.shape)
