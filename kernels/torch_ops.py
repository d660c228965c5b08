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
# ISTA, in one of two exact forms chosen by the number of token rows M against the width C.
# The official step  relu(x + eta (x W - x W^T W) - eta lambda)  is linear in x before the ReLU, and
#   x W - x W^T W = x A        with the C x C operator  A = W - W^T W        (operator form)
#                 = r W        with the residual rows   r = x - x W^T         (direct form)
# Why both (FLOPs per step; a GEMM (m x k) x (k x n) is 2mkn):
#   operator  forward 2C^3 (A) + 2MC^2 (x A);  backward 2 x 2MC^2 (dx, dA) + 2 x 2C^3 (dA -> dW)
#             = 6C^3 + 6MC^2 for forward + backward
#   direct    forward 2 x 2MC^2 (x W^T, r W);  backward 4 x 2MC^2 (dr, dx, and dW = eta r^T g - dr^T x)
#             = 12MC^2 for forward + backward
# Both break even at M = C, for inference (2C^3 + 2MC^2 = 4MC^2) and for training alike. Training
# batches have M = batch x tokens >> C and take the operator form; a few images (batch-1 inference,
# analysis: M = 5 .. 197 tokens at C = 384 .. 768) take the direct form, whose cost shrinks with M
# instead of paying the C^3 products on every call. ista_uses_operator_form is the rule; both forms
# are exact in real arithmetic (float64 tests agree with the reference to ~1e-15).
#
# Operator form: A costs one C x C x C product per step; then every token row needs ONE (M x C) x (C x C)
# GEMM instead of the official three (or two for the direct form).
#   A = W - W^T W                         plain autograd ops, in the weight's dtype (fp32 masters)
#   out = relu(x + eta x_c A_c - eta lam)  x_c, A_c: x and A in the compute dtype (bf16 under autocast)
#   backward of the apply step, g = dout * (out > 0):
#     dx = g (the residual) ; dx_c = eta g_c A_c^T ; dA_c = eta x_c^T g_c
#   and autograd turns dA into dW = dA - W (dA + dA^T) through the two C x C products.
# 1 + 2 token GEMMs against 3 + 6 for autograd of the official form.
# Direct form (_ISTADirect): 2 token GEMMs forward, 4 backward, no C x C x C product.
#   r_c = x_c - x_c W_c^T ; out = relu(x + eta r_c W_c - eta lam)
#   backward, g = dout * (out > 0):  dr = eta g_c W_c^T ; dx_c = dr - dr W_c ; dx = g (the residual) ;
#   dW_c = eta r_c^T g_c - dr^T x_c
# Under autocast, in both forms, the residual x and the output keep x's dtype (fp32), exactly as
# autocast runs the official code (its elementwise x + update is fp32): only the GEMM operands are 16-bit.
# Non-finite values: a NaN in x or W, or a row of x or of the upstream gradient that is all NaN or
# +-Inf, lands where the reference puts it, in the output and both gradients, in both forms; so does a
# lone Inf in x in the direct form. Otherwise Inf meets Infs of the other sign in other products than in
# the reference's three (x W - (x W^T) W): a lone Inf in x in the operator form (x (W - W^T W)), an Inf
# in W, or a lone Inf in the upstream gradient, in either form; there NaN and +-Inf can trade places
# (ista.py's kernel gives exactly the operator form's pattern).
# ---------------------------------------------------------------------------------------------------
def ista_uses_operator_form(rows: int, width: int) -> bool:
    """Whether ista_step_torch takes the operator form for `rows` token rows (M, the product of x's
    leading dims) of width C: when M >= C, where it needs fewer FLOPs than the direct form (above)."""
    return rows >= width


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


class _ISTADirect(torch.autograd.Function):
    """The direct form for 2-D x (M, C): relu(x + eta (x_c - x_c W_c^T) W_c - eta lambda); xc is x in
    W_c's dtype, or None if x already is. 2 GEMMs forward, 4 backward (the comment above). Plain
    autograd of the same expression also runs 2 + 4 GEMMs, with more elementwise passes (the eta
    scalings, the gradient sums); this measured 0.82-0.98x of its forward + backward time at C = 384,
    M = 5 .. 256, on one CPU thread (three runs)."""

    @staticmethod
    def forward(ctx, x, xc, wc, step_size, lambd):
        xg = x if xc is None else xc
        r = torch.addmm(xg, xg, wc.t(), alpha=-1.0)                     # r = x - x W^T, one rounding
        if xc is None:
            out = torch.addmm(x, r, wc, alpha=step_size)                # residual rides in the GEMM epilogue
        else:
            out = torch.add(x, torch.mm(r, wc), alpha=step_size)        # 16-bit GEMM, residual in x's dtype
        out = out.sub_(step_size * lambd).relu_()
        # out is the next layer's input and its sign is the ReLU mask, as in _ISTAApply.
        ctx.save_for_backward(xg, wc, r, out)
        ctx.step_size, ctx.separate = step_size, xc is not None
        return out

    @staticmethod
    def backward(ctx, dout):
        xg, wc, r, out = ctx.saved_tensors
        g = torch.ops.aten.threshold_backward(dout, out, 0)             # relu's backward (NaN passes dout)
        gc = g.to(wc.dtype)
        dr = torch.mm(gc, wc.t()).mul_(ctx.step_size)                   # dr = eta g W^T
        dw = torch.mm(r.t(), gc).mul_(ctx.step_size)                    # eta r^T g ...
        dw = torch.addmm(dw, dr.t(), xg, alpha=-1.0)                    # ... - dr^T x
        dxg = torch.addmm(dr, dr, wc, alpha=-1.0)                       # dr - dr W
        if ctx.separate:
            return g, dxg, dw, None, None
        return dxg.add_(g), None, dw, None, None


def ista_step_torch(x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1, lambd: float = 0.1,
                    compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x: (..., C), weight: (C, C) -> (..., C) in x's dtype; the same function as ista_step_ref.
    GEMMs run in compute_dtype (default x's dtype); the operator form forms A in the weight's dtype.
    The form follows ista_uses_operator_form(M, C), M the number of token rows."""
    compute_dtype = compute_dtype or x.dtype
    with torch.autocast(x.device.type, enabled=False):      # the operands are cast as autocast would
        x2 = x.reshape(-1, x.shape[-1])
        if ista_uses_operator_form(x2.shape[0], x2.shape[1]):
            x2, xc, a = ista_operands(x2, weight, compute_dtype)
            return _ISTAApply.apply(x2, xc, a, step_size, lambd).view(x.shape)
        xc = None if compute_dtype == x.dtype else x2.to(compute_dtype)
        return _ISTADirect.apply(x2, xc, weight.to(compute_dtype), step_size, lambd).view(x.shape)
