"""Fast PyTorch paths for MSSA, ISTA and ODL: exact CRATE math with fewer GEMMs (MSSA, ISTA), fewer
elementwise passes (ODL), hand-written backward passes, and on request (``recompute``) far fewer saved
activations: the attention's row log-sum-exp instead of its probabilities, a fifth of ODL's bytes.

The hand-written backward passes are first-order only (@once_differentiable): differentiating them again
(double backward, Hessian-vector products, gradient penalties) raises an error instead of silently
dropping the terms through tensors they save without a graph; impl="reference" gives higher orders.

They run on any device and are the default off CUDA. Each has the same signature and semantics as
its twin in reference.py and is tested against it in float64.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


# ---------------------------------------------------------------------------------------------------
# One forward, setup and backward as an autograd.Function (no triton here: CPU-only installs use it too)
# ---------------------------------------------------------------------------------------------------
def autograd_function(name: str, forward, setup_context, backward) -> type[torch.autograd.Function]:
    """An autograd.Function `name` whose forward(ctx, *inputs) runs output = forward(*inputs) and then
    setup_context(ctx, inputs, output), with the given backward: one forward, setup and backward shared
    by a torch.library op's registration and plain Functions (_ISTAApply and _ODL here; the Triton ops'
    eager twins, _triton.op_with_twin).

    forward calls the setup itself: a Function with a separate setup_context binds its arguments through
    inspect.signature on every call (measured ~30 us of host time per call)."""
    def run(ctx, *inputs):
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(run), "backward": staticmethod(backward),
                                                   "__module__": __name__, "__qualname__": name,
                                                   "__doc__": f"{forward.__name__} with its autograd."})


# ---------------------------------------------------------------------------------------------------
# MSSA: tied q = k = v attention.  O = softmax(scale * w w^T) w
# Backward with P = softmax rows:
#   dP = dO w^T ; dS = P * (dP - rowsum(dP * P)) ; dw = P^T dO + scale * (dS + dS^T) w
# Autograd of the reference needs 4 batched GEMMs; this needs 3 in fp32 and fewer N x N passes.
# (SDPA with q = k = v measured slower on CPU: 1.1x in fp32, 7x in bf16.)
# Causal (query i attends to keys j <= i): the scores above the diagonal are -inf before the softmax and
# dS is exactly 0 there (masked_fill's backward in the reference); every product stays the full dense
# one, as in the reference, so the masked half costs what it did (the Triton kernels skip it) and a
# non-finite w_j or dO_i meets the masked zeros of P exactly where the reference's products do
# (0 * NaN = NaN: a NaN in w[k, c] reaches out[i < k, c]; one in dO[k, c] reaches dw[j > k, c]).
# ---------------------------------------------------------------------------------------------------
def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool, True above the diagonal: the (query i, key j > i) scores a causal softmax drops."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


def _scores(w3: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """(BH, N, D) -> (BH, N, N): scale w w^T, -inf above the diagonal when causal."""
    n = w3.shape[1]
    s = torch.baddbmm(w3.new_empty(w3.shape[0], n, n), w3, w3.transpose(1, 2), beta=0.0, alpha=scale)
    return s.masked_fill_(causal_mask(n, w3.device), float("-inf")) if causal else s


def _wide(s: torch.Tensor) -> torch.Tensor:
    """S itself in fp32 / fp64, else an fp32 copy (ATen's softmax accumulates 16-bit scores in fp32)."""
    return s if s.dtype in (torch.float32, torch.float64) else s.float()


def _lse_and_probs(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, P) of scores S (BH, N, N): each row's log-sum-exp (BH, N, 1), fp32 for 16-bit S, and P = exp(S - L)
    in S's dtype, rounded once (formed in place: S is consumed)."""
    wide = _wide(s)
    lse = torch.logsumexp(wide, dim=-1, keepdim=True)
    return lse, wide.sub_(lse).exp_().to(s.dtype)


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """P = exp(S - L) in S's dtype by _lse_and_probs's very steps (S is consumed)."""
    return _wide(s).sub_(lse).exp_().to(s.dtype)


class _TiedAttention(torch.autograd.Function):
    # Runs with autocast off (its inputs arrive already cast). softmax and its backward are the fused
    # ATen kernels, which accumulate in fp32 for 16-bit inputs; dS = P * (dP - rowsum(dP * P)) is then
    # formed from the very tiles it subtracts (the diagonal of tied attention cancels there).
    # recompute=False saves P (BH x N x N); recompute=True saves the row log-sum-exp L (BH x N) instead
    # and the backward recomputes P = exp(S - L): one more batched GEMM (S = scale w w^T) and one exp pass,
    # and the forward forms P the same way, so in eager mode both passes use the same numbers, bit for bit.
    @staticmethod
    def forward(ctx, w: torch.Tensor, scale: float, causal: bool, recompute: bool) -> torch.Tensor:
        B, H, N, D = w.shape
        with torch.autocast(w.device.type, enabled=False):
            w3 = w.reshape(B * H, N, D)        # one copy of the strided head split, then plain bmm
            s = _scores(w3, scale, causal)
            if recompute:
                lse, p = _lse_and_probs(s)                                    # (BH, N, 1), (BH, N, N)
            else:
                p = torch.softmax(s, dim=-1)                                  # (BH, N, N)
            o = torch.bmm(p, w3)                                              # (BH, N, D)
        ctx.save_for_backward(w3, lse if recompute else p)
        ctx.scale, ctx.causal, ctx.recompute = scale, causal, recompute
        return o.view(B, H, N, D)

    @staticmethod
    @once_differentiable
    def backward(ctx, do: torch.Tensor):
        w3, saved = ctx.saved_tensors
        with torch.autocast(do.device.type, enabled=False):
            p = _probs(_scores(w3, ctx.scale, ctx.causal), saved) if ctx.recompute else saved
            do3 = do.reshape(w3.shape).to(w3.dtype)
            dp = torch.bmm(do3, w3.transpose(1, 2))                           # dP = dO w^T
            ds = torch.ops.aten._softmax_backward_data(dp, p, -1, p.dtype)    # dS = P (dP - rowsum(dP P))
            if ctx.causal:      # P = 0 there already, but 0 * (a non-finite dP) is not 0
                ds.masked_fill_(causal_mask(p.shape[-1], p.device), 0.0)
            dw = torch.bmm(p.transpose(1, 2), do3)                            # dV
            # dQ + dK = scale (dS + dS^T) w. Measured on CPU: forming dS + dS^T first wins in fp32,
            # two transposed-operand GEMMs win in bf16/fp16 (the N x N transpose-add is then the cost).
            if ds.dtype in (torch.float32, torch.float64):
                dw = torch.baddbmm(dw, ds + ds.transpose(1, 2), w3, alpha=ctx.scale)
            else:
                dw = torch.baddbmm(dw, ds, w3, alpha=ctx.scale)
                dw = torch.baddbmm(dw, ds.transpose(1, 2), w3, alpha=ctx.scale)
        return dw.view(do.shape), None, None, None


def mssa_attention_torch(w: torch.Tensor, scale: float, causal: bool = False, recompute: bool = False) -> torch.Tensor:
    """w: (B, H, N, D) -> (B, H, N, D), tied q = k = v softmax attention with a 3-GEMM backward;
    causal: query i attends to keys j <= i; recompute: save the row log-sum-exp instead of the
    probabilities (N times fewer bytes) and recompute them in the backward (one more batched GEMM);
    without a backward to come (no grad mode, or w needs none) the plain softmax forward runs."""
    recompute = recompute and torch.is_grad_enabled() and w.requires_grad
    return _TiedAttention.apply(w, scale, causal, recompute)


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


# The autograd of the apply step, shared by _ISTAApply here and by ista.py's op and its eager twin
# (autograd_function).
def ista_apply_setup_context(ctx, inputs, output):
    x, xc, a, step_size, _ = inputs
    # out is the next layer's input, kept alive anyway: saving it costs no memory, and its sign is the
    # ReLU mask, so no pre-activation copy is stored.
    ctx.save_for_backward(x if xc is None else xc, a, output)
    ctx.step_size, ctx.separate = step_size, xc is not None


@once_differentiable
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


_ISTAApply = autograd_function("_ISTAApply", ista_apply_forward, ista_apply_setup_context, ista_apply_backward)


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
    @once_differentiable
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


# ---------------------------------------------------------------------------------------------------
# ODL (CRATE-alpha, docs/DESIGN.md §2.2): two non-negative ISTA steps from a zero code on an
# overcomplete dictionary D (d x m, m = 4d in every preset), then the decoupled synthesis dictionary D1.
# Row form, x: (M, d); eta = step size, lam = lambda; the official port's own order of operations:
#   a1  = relu(eta x D - eta lam)            GEMM 1  (M x d)(d x m)
#   e   = a1 D^T - x                         GEMM 2  (M x m)(m x d)   the first code's residual
#   a2  = relu(a1 - eta e D - eta lam)       GEMM 3  (M x d)(d x m)
#   out = a2 D1^T (+ residual)               GEMM 4  (M x m)(m x d)
# Backward by hand; dout the upstream gradient, [.] a ReLU mask (taken from the outputs a1, a2, as
# relu's own backward does):
#   dD1 = dout^T a2 ;  g2 = (dout D1) [a2 > 0] ;  t = g2 D^T
#   g1  = (g2 - eta t D) [a1 > 0]
#   dx  = eta (t + g1 D^T) ;  dD = eta (x^T g1 - e^T g2 - t^T a1) ;  d residual = dout
# Why (a GEMM (M x k)(k x n) is 2Mkn FLOPs, so each of these is 2Mdm = 8Md^2; elements at m = 4d):
#   autograd of the port: 4 GEMMs forward + 8 backward = 24 Mdm FLOPs; it saves x, a1, e and a2,
#     (2d + 2m) M = 10 Md elements per call (measured with saved_tensors_hooks, tests/test_odl.py).
#   this path: the same 4 GEMMs forward with the scale, shift, ReLU and residual folded into addmm, then
#   one of two backward layouts, the caller's choice (odl_step's ``recompute``):
#     recompute=False (default): saves x_c, a1, e and a2 (10 Md, the port's bytes) and runs the port's
#       8 backward GEMMs: 12 in all, with fewer elementwise passes than autograd of the port;
#     recompute=True: saves only x_c and e (2 Md elements: a fifth) and recomputes a1 from x_c and a2
#       from a1 and e (2 GEMMs, 14 in all: 28 Mdm FLOPs, +17%) with the torch forward's own expressions
#       (its very numbers; after odl.py's Triton forward, equal up to rounding). ODL's saved codes are
#       the largest activations of a CRATE-alpha layer: 775 MB of bf16 per layer at B/16, batch 256,
#       under autograd of the port. (Saving x_c and a2, 5 Md, needs the same 2 recompute GEMMs, for a1
#       and e; saving x_c, a1 and e, 6 Md, needs one, for a2.)
#   Measured against autograd of the port, forward + backward with the residual, one CPU thread (the
#   2-core machine was shared), interleaved runs, medians of 80, two runs, at the bench rows (M, d) =
#   (520, 192) and (130, 384): recompute=False 1.08-1.11x and 1.04-1.06x its speed in fp32, 0.98-1.03x
#   and 0.97-1.02x in bf16; recompute=True (then saving x_c and a2) 0.93-0.96x and 0.92x in fp32,
#   0.87-0.90x and 0.89x in bf16. Every exact variant runs the port's 12 GEMMs or more, so on a
#   GEMM-bound CPU none is much faster than autograd. (The codes' zero gradients are not materialized:
#   the two M x m fills were 12% of the bf16 step's summed op time under the profiler.)
# Under autocast only the GEMM operands (x_c, D_c, D1_c) and the codes are 16-bit; with a residual the
# output has the residual's dtype promoted with the compute dtype (the port adds a 16-bit matmul result
# to the fp32 stream), else the compute dtype, as the port's last matmul. The forward evaluates the
# port's expressions in its order; the backward groups the same products differently (dx = eta (t +
# g1 D^T), where autograd adds eta g1 D^T to eta g2 D^T); a NaN or +-Inf in x, D or the upstream
# gradient (one element or one row) lands where the port's autograd puts it, in the output and every
# gradient, with either recompute (tests/test_odl.py).
# ---------------------------------------------------------------------------------------------------
def odl_first_code(xc: torch.Tensor, dc: torch.Tensor, step_size: float, lambd: float) -> torch.Tensor:
    """a1 = relu(eta x D - eta lambda): xc (M, d), dc (d, m) -> (M, m), one GEMM with the shift as bias."""
    shift = xc.new_full((dc.shape[1],), -step_size * lambd)
    return torch.addmm(shift, xc, dc, alpha=step_size).relu_()


def odl_code_residual(a1: torch.Tensor, dc: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """e = a1 D^T - x: (M, m), (d, m), (M, d) -> (M, d), one GEMM, rounded once."""
    return torch.addmm(xc, a1, dc.t(), beta=-1.0)


def odl_second_code(a1: torch.Tensor, e: torch.Tensor, dc: torch.Tensor, step_size: float,
                    lambd: float) -> torch.Tensor:
    """a2 = relu(a1 - eta e D - eta lambda): (M, m), (M, d), (d, m) -> (M, m), one GEMM."""
    return torch.addmm(a1, e, dc, alpha=-step_size).sub_(step_size * lambd).relu_()


def odl_forward(xc: torch.Tensor, dc: torch.Tensor, d1c: torch.Tensor, residual: torch.Tensor | None,
                step_size: float, lambd: float,
                recompute: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, a1, e, a2) for 2-D operands in one compute dtype: xc (M, d), dc and d1c (d, m); residual
    (M, d) in any float dtype or None. out: (M, d), the residual's dtype promoted with the compute dtype
    (the compute dtype without residual); a1, a2: (M, m), the two codes, e: (M, d), the first code's
    residual, for the backward (recompute: whether it keeps the codes or recomputes them; odl_setup_context)."""
    a1 = odl_first_code(xc, dc, step_size, lambd)
    e = odl_code_residual(a1, dc, xc)
    a2 = odl_second_code(a1, e, dc, step_size, lambd)
    if residual is None:
        out = torch.mm(a2, d1c.t())
    elif residual.dtype == a2.dtype:
        out = torch.addmm(residual, a2, d1c.t())                     # residual rides in the GEMM epilogue
    else:
        out = torch.add(residual, torch.mm(a2, d1c.t()))             # 16-bit GEMM, fp32 residual stream
    return out, a1, e, a2


# The autograd of the step, shared by _ODL here and by odl.py's op and its eager twin: inputs
# (xc, dc, d1c, residual, step_size, lambd, recompute), outputs (out, a1, e, a2). The forward hands
# a1 and e out either way (the Triton forward writes them to memory anyway); only what is saved differs.
def odl_setup_context(ctx, inputs, output):
    xc, dc, d1c, residual, step_size, lambd, recompute = inputs
    _, a1, e, a2 = output
    if recompute:
        ctx.save_for_backward(xc, dc, d1c, e)             # 2 Md elements; the codes are recomputed (above)
    else:
        ctx.save_for_backward(xc, dc, d1c, e, a1, a2)     # 10 Md, as the port's autograd
    ctx.step_size, ctx.lambd = step_size, lambd
    ctx.residual_dtype = None if residual is None else residual.dtype
    ctx.mark_non_differentiable(a1, e, a2)
    ctx.set_materialize_grads(False)      # no zero-filled gradients for the codes (2 M x m fills per call)


@once_differentiable
def odl_backward(ctx, dout: torch.Tensor, *_dcodes):
    """Gradients w.r.t. (xc, dc, d1c, residual, step_size, lambd, recompute), in the compute dtype
    except the residual's (its own dtype); 8 GEMMs, plus 2 recomputing a1 and a2 when they were not saved."""
    xc, dc, d1c, e, *codes = ctx.saved_tensors
    eta = ctx.step_size
    with torch.autocast(dout.device.type, enabled=False):
        if codes:
            a1, a2 = codes
        else:
            a1 = odl_first_code(xc, dc, eta, ctx.lambd)
            a2 = odl_second_code(a1, e, dc, eta, ctx.lambd)
        gc = dout.to(a2.dtype)
        dd1 = torch.mm(gc.t(), a2)
        # relu's own backward (grad where the output is > 0): a NaN code passes 0 on, as the port's does.
        g2 = torch.ops.aten.threshold_backward(torch.mm(gc, d1c), a2, 0)
        t = torch.mm(g2, dc.t())
        g1 = torch.ops.aten.threshold_backward(torch.addmm(g2, t, dc, alpha=-eta), a1, 0)
        dx = torch.addmm(t, g1, dc.t(), beta=eta, alpha=eta)
        dd = torch.mm(xc.t(), g1).addmm_(e.t(), g2, alpha=-1.0).addmm_(t.t(), a1, alpha=-1.0).mul_(eta)
    dres = None if ctx.residual_dtype is None else dout.to(ctx.residual_dtype)
    return dx, dd, dd1, dres, None, None, None


_ODL = autograd_function("_ODL", odl_forward, odl_setup_context, odl_backward)


def odl_operands(x: torch.Tensor, D: torch.Tensor, D1: torch.Tensor, residual: torch.Tensor | None,
                 compute_dtype: torch.dtype, contiguous: bool = True):
    """For autocast off: x as contiguous rows (M, d) in the compute dtype, D and D1 in the compute dtype
    (contiguous copies for the kernels, which read whole rows; as given for torch's GEMMs, which take a
    transposed view such as CRATE-GPT's W^T as it is, so an fp32 step saves no copy of the weights), the
    residual as contiguous rows (M, d) in its own dtype (or None). D1 given as the very tensor D (CRATE-GPT's
    tied D = D1 = W^T) is cast once and passed on as a second view of it (torch.compile refuses one tensor
    given twice to an autograd.Function). The casts are autograd ops outside the Functions, so gradients
    return in the inputs' dtypes."""
    def cast(t):
        t = t.to(compute_dtype)
        return t.contiguous() if contiguous else t

    d = x.shape[-1]
    xc = x.reshape(-1, d).to(compute_dtype).contiguous()
    r = None if residual is None else residual.reshape(-1, d).contiguous()
    dc = cast(D)
    d1c = dc.view_as(dc) if D1 is D else cast(D1)
    return xc, dc, d1c, r


def odl_step_torch(x: torch.Tensor, D: torch.Tensor, D1: torch.Tensor, step_size: float = 0.1,
                   lambd: float = 0.1, residual: torch.Tensor | None = None,
                   compute_dtype: torch.dtype | None = None, recompute: bool = False) -> torch.Tensor:
    """x: (..., d); D, D1: (d, m); residual: x's shape or None -> (..., d); the same function as
    odl_step_ref (+ residual). The GEMMs run in compute_dtype (default x's dtype); the output has the
    residual's dtype promoted with it, or compute_dtype without residual. recompute: the backward saves
    x_c and e and recomputes a1 and a2 (a fifth of the saved bytes, 2 more GEMMs; above)."""
    compute_dtype = compute_dtype or x.dtype
    with torch.autocast(x.device.type, enabled=False):      # the operands are cast as autocast would
        out, *_ = _ODL.apply(*odl_operands(x, D, D1, residual, compute_dtype, contiguous=False), step_size,
                             lambd, recompute)
    return out.view(x.shape)
