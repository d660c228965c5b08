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
    INTERPRET,
    arch_of,
    cast,
    check_tensor,
    dot,
    dot_precision,
    dtype_name,
    interp_bf16,
    launch,
    register_op,
    select_configs,
)
from .torch_ops import ista_apply_backward, ista_step_composed

# Autotune candidates: dtype class, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, and whether the config
# compiles without register spills on sm_80 and on sm_90a, with Triton 3.6 and 3.8 alike.
# ``python -m crate_fast.kernels.aot_check`` verifies every admitted combination.
_ROWS = [
    ("16bit", 128, 128, 64, 8, 3, False, True), ("16bit", 128, 128, 64, 8, 4, False, True),
    ("16bit", 128, 128, 64, 8, 2, False, True), ("16bit", 128, 64, 64, 4, 4, False, True),
    ("16bit", 64, 64, 64, 4, 4, True, True), ("16bit", 64, 64, 32, 4, 3, True, True),
    ("fp32", 64, 64, 64, 4, 4, False, True), ("fp32", 64, 64, 32, 4, 2, True, True),
    ("fp32", 32, 64, 32, 4, 2, True, True),
]
_INTERPRETER_ROW = ("any", 32, 32, 32, 4, 1, True, True)


def _configs(rows: list) -> list:
    out = []
    for row in ([_INTERPRETER_ROW] if INTERPRET else rows):
        cfg = triton.Config({"BLOCK_M": row[1], "BLOCK_N": row[2], "BLOCK_K": row[3], "GROUP_M": 8},
                            num_warps=row[4], num_stages=row[5])
        cfg.fits = row     # read by admitted()
        out.append(cfg)
    return out


GEMM_CONFIGS = _configs(_ROWS)


def admitted(configs: list, dtype: str, arch: int) -> list:
    """The candidates that fit this GEMM dtype ("fp16", "bf16", "fp32") and arch (80, 90)."""
    cls = "fp32" if dtype == "fp32" else "16bit"
    return [c for c in configs if c.fits[0] in (cls, "any") and c.fits[6 if arch < 90 else 7]]


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
    # Grouped program order: GROUP_M row blocks share each B column panel while it is in L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

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
    out = tl.maximum(x + eta * acc - eta_lambd, 0.0)             # relu(x + eta x A - eta lambda)
    tl.store(OUT + c_off, cast(out, OUT.dtype.element_ty, INTERP_BF16), mask=c_mask)


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------
def _ista_forward(x: torch.Tensor, xc: torch.Tensor | None, a: torch.Tensor, eta: float, lambd: float,
                  traced: bool = False) -> torch.Tensor:
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
# torch.library op + autograd (the backward is plain torch ops, so torch.compile can fuse it), and the
# eager twin
# ------------------------------------------------------------------------------------------------
@register_op("crate_fast::ista_apply")
def ista_apply(x: torch.Tensor, xc: torch.Tensor | None, a: torch.Tensor, eta: float, lambd: float) -> torch.Tensor:
    return _ista_forward(x, xc, a, eta, lambd, traced=True)


@ista_apply.register_fake
def _(x, xc, a, eta, lambd):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, xc, a, eta, _ = inputs
    ctx.save_for_backward(x if xc is None else xc, a, output)
    ctx.eta, ctx.separate = eta, xc is not None


def _backward(ctx, dout):
    xg, a, out = ctx.saved_tensors
    return (*ista_apply_backward(xg, a, out, dout, ctx.eta, ctx.separate), None, None)


ista_apply.register_autograd(_backward, setup_context=_setup_context)


class _ISTAApplyTriton(torch.autograd.Function):
    """The same forward/backward for eager mode, without the torch.library dispatch overhead."""

    @staticmethod
    def forward(ctx, x, xc, a, eta, lambd):
        out = _ista_forward(x, xc, a, eta, lambd)
        ctx.save_for_backward(x if xc is None else xc, a, out)
        ctx.eta, ctx.separate = eta, xc is not None
        return out

    backward = staticmethod(_backward)


def _apply(x, xc, a, eta, lambd):
    if torch.compiler.is_compiling():
        return ista_apply(x, xc, a, eta, lambd)
    return _ISTAApplyTriton.apply(x, xc, a, eta, lambd)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------
def ista_step_triton(x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1, lambd: float = 0.1,
                     compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x: (..., C), weight: (C, C) -> (..., C) in x's dtype; the GEMM runs in compute_dtype."""
    compute_dtype = compute_dtype or x.dtype
    check_tensor(x, "ista_step")
    check_tensor(weight, "ista_step weight")
    if compute_dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"ista_step: the Triton kernel computes in fp32/fp16/bf16, not {compute_dtype}")
    x = x.contiguous()
    return ista_step_composed(_apply, x, weight, step_size, lambd, compute_dtype)
