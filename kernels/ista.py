"""Fused ISTA step for CRATE in Triton: the token GEMM with the residual, shift and ReLU in its epilogue.

Operator form (torch_ops.py): x W - x W^T W = x A with A = W - W^T W (C x C, formed by cuBLAS in the
weight's dtype; autograd turns dA into dW). With tokens as rows, x: (M, C):
    forward   out = relu(x + eta x_c A_c - eta lambda)    one GEMM, epilogue relu(x + eta acc - eta lambda)
    backward  g = dout * (out > 0); dx_c = eta g A^T; dA = eta x_c^T g     cuBLAS + one elementwise pass
The forward writes `out` once, in x's dtype (fp32 under autocast, like the official code's residual),
reading x_c (16-bit) for the GEMM and x for the epilogue: no pre-activation is stored.

The backward stays on cuBLAS on purpose: a Triton GEMM with the ReLU gate fused into its prologue
(A operand through registers) measured 3x slower than where() + cuBLAS on an H100 (bench/results).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import (
    FITS,
    SPILLS,
    ConfigRow,
    admitted,
    arch_of,
    cast,
    configs,
    dot,
    dot_precision,
    dtype_name,
    grouped_tile,
    interp_bf16,
    launch,
    register_op,
    select_configs,
)
from .torch_ops import ista_apply_backward, ista_apply_setup_context, ista_operands

# ------------------------------------------------------------------------------------------------
# Autotune candidates (ConfigRow; no head dim: sm80/sm90 say whether the row compiles without spills).
# ------------------------------------------------------------------------------------------------
_ROWS = [
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), warps=8, stages=3, sm80=SPILLS, sm90=FITS),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), warps=8, stages=4, sm80=SPILLS, sm90=FITS),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), warps=8, stages=2, sm80=SPILLS, sm90=FITS),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), warps=4, stages=4, sm80=SPILLS, sm90=FITS),
    ConfigRow("16bit", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), warps=4, stages=4, sm80=FITS, sm90=FITS),
    ConfigRow("16bit", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), warps=4, stages=3, sm80=FITS, sm90=FITS),
    ConfigRow("fp32", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), warps=4, stages=4, sm80=SPILLS, sm90=FITS),
    ConfigRow("fp32", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), warps=4, stages=2, sm80=FITS, sm90=FITS),
    ConfigRow("fp32", dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32), warps=4, stages=2, sm80=FITS, sm90=FITS),
]
GEMM_CONFIGS = configs(_ROWS, ConfigRow("any", dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32), warps=4, stages=1,
                                        sm80=FITS, sm90=FITS), GROUP_M=8)


def _prune(configs, named_args, **kwargs):
    a = named_args["A"]
    return select_configs(admitted(configs, dtype_name(a.dtype), arch_of(a)))


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------
@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ista_fwd_kernel(
    A, B, X, OUT,                    # A = x_c: (M, K); B = A_c: (K, N); X (residual), OUT: (M, N); rows contiguous
    M, N, K, s_bk, s_bn,
    eta, eta_lambd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    eta, eta_lambd = tl.cast(eta, tl.float32), tl.cast(eta_lambd, tl.float32)   # fp64 under torch.compile
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)   # grouped order, shared B panels in L2

    # 64-bit row offset once per program (M * C can pass 2^31); 32-bit offsets inside the tile keep
    # the pointer tensors small (full 64-bit 2D offsets cost ~2 registers per element and spilled).
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    A += row0 * K
    X += row0 * N
    OUT += row0 * N
    rows = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rows < M - row0, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + rows[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        b = tl.load(B + offs_k[:, None] * s_bk + offs_n[None, :] * s_bn,
                    mask=(offs_k[:, None] < K) & mask_n[None, :], other=0.0)
        acc = dot(a, b, acc, INTERP_BF16, PRECISION)

    c_off = rows[:, None] * N + offs_n[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    x = tl.load(X + c_off, mask=c_mask, other=0.0).to(tl.float32)
    # relu(x + eta x A - eta lambda). propagate_nan: a NaN pre-activation stays NaN, as torch's relu
    # keeps it (the default maxnum would return 0, turning a NaN input into a finite output).
    out = tl.maximum(x + eta * acc - eta_lambd, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(OUT + c_off, cast(out, OUT.dtype.element_ty, INTERP_BF16), mask=c_mask)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------
def _ista_forward(x: torch.Tensor, xc: torch.Tensor | None, a: torch.Tensor, eta: float, lambd: float,
                  traced: bool = False) -> torch.Tensor:
    """x: (M, C) rows contiguous, the residual; xc: x in a's dtype (None: x is); a: (C, C) -> (M, C) in
    x's dtype."""
    xc = x if xc is None else xc
    M, K = xc.shape
    N = a.shape[1]
    out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    launch(_ista_fwd_kernel, traced)[grid](
        xc, a, x, out, M, N, K, a.stride(0), a.stride(1), eta, eta * lambd,
        INTERP_BF16=interp_bf16(xc.dtype), PRECISION=dot_precision(xc.dtype))
    return out


# ------------------------------------------------------------------------------------------------
# torch.library op and its eager twin, both with torch_ops' autograd of the apply step (plain torch ops
# in the backward, so torch.compile can fuse them)
# ------------------------------------------------------------------------------------------------
@register_op("crate_fast::ista_apply")
def ista_apply(x: torch.Tensor, xc: torch.Tensor | None, a: torch.Tensor, eta: float, lambd: float) -> torch.Tensor:
    return _ista_forward(x, xc, a, eta, lambd, traced=True)


@ista_apply.register_fake
def _(x, xc, a, eta, lambd):
    return torch.empty_like(x)


ista_apply.register_autograd(ista_apply_backward, setup_context=ista_apply_setup_context)


class _ISTAApplyTriton(torch.autograd.Function):
    """ista_apply and its autograd for eager calls, without the torch.library dispatch (see register_op)."""

    # forward(ctx, ...) calls the shared setup itself (a separate setup_context costs an
    # inspect.signature bind per call, torch_ops._ISTAApply).
    @staticmethod
    def forward(ctx, x, xc, a, eta, lambd):
        out = _ista_forward(x, xc, a, eta, lambd)
        ista_apply_setup_context(ctx, (x, xc, a, eta, lambd), out)
        return out

    backward = staticmethod(ista_apply_backward)


# ------------------------------------------------------------------------------------------------
# Entry point, for the inputs ista_step admitted: CUDA (or the interpreter), x and the compute dtype
# fp32/fp16/bf16, non-empty
# ------------------------------------------------------------------------------------------------
def ista_step_triton(x: torch.Tensor, weight: torch.Tensor, step_size: float, lambd: float,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """x: (..., C), weight: (C, C) -> (..., C) in x's dtype; the GEMM runs in compute_dtype."""
    with torch.autocast(x.device.type, enabled=False):      # the operands are cast as autocast would
        x2, xc, a = ista_operands(x.contiguous(), weight, compute_dtype)    # the kernel reads whole rows
        if torch.compiler.is_compiling():
            out = ista_apply(x2, xc, a, step_size, lambd)
        else:
            out = _ISTAApplyTriton.apply(x2, xc, a, step_size, lambd)
    return out.view(x.shape)
