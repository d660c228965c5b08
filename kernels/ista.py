"""Fused ISTA step for CRATE in Triton: one GEMM each way, the elementwise work in prologue/epilogue.

Operator form (see torch_ops.py): x W - x W^T W = x A with A = W - W^T W (C x C, formed once per step
by cuBLAS in the weight's dtype), so with tokens as rows, x: (M, C):
    forward   out = relu(x + eta x A - eta lambda)       GEMM, epilogue  relu(x + eta acc - eta lambda)
    backward  g = dout * (out > 0)                        prologue of the GEMM, which also stores g once
              dx = g + eta g A^T                          same GEMM, epilogue  g + eta acc
              P = x^T g ; dW = eta (P - W (P + P^T))      cuBLAS (its split-K suits the C x C output)
Only x, A and out are saved (out is the next layer's input anyway; its sign is the ReLU mask), so no
pre-activation is stored. One kernel body serves both GEMMs through constexpr switches; A^T is read
through strides, never copied.
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
from .torch_ops import ista_operator

# Epilogues of the fused GEMM: C = f(acc, E1, E2)
EPI_ISTA, EPI_DX = 1, 2
# The two GEMMs of a forward + backward, as (MASK_A, EPILOGUE).
VARIANTS = [(False, EPI_ISTA), (True, EPI_DX)]


# Autotune candidates: dtype class, BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, and which GEMM variants
# compile without register spills on sm_80 and on sm_90a, as a level: 0 none, 1 the forward GEMM,
# 2 also the backward GEMM (gated prologue: A through registers; two epilogue loads); with Triton 3.6
# and 3.8 alike.
# ``python -m crate_fast.kernels.aot_check`` verifies every admitted combination.
_ROWS = [
    ("16bit", 128, 128, 64, 8, 3, 1, 2), ("16bit", 128, 128, 64, 8, 4, 1, 2), ("16bit", 128, 128, 64, 8, 2, 1, 2),
    ("16bit", 256, 128, 64, 8, 3, 0, 1), ("16bit", 128, 64, 64, 4, 4, 0, 1), ("16bit", 64, 128, 64, 4, 4, 0, 1),
    ("16bit", 64, 64, 64, 4, 4, 2, 2), ("16bit", 64, 64, 32, 4, 3, 2, 2),
    ("fp32", 64, 64, 64, 4, 4, 0, 1), ("fp32", 64, 64, 32, 4, 2, 2, 2), ("fp32", 32, 64, 32, 4, 2, 1, 1),
]
_INTERPRETER_ROW = ("any", 32, 32, 32, 4, 1, 2, 2)


def variant_level(mask_a: bool, epilogue: int) -> int:
    return 2 if mask_a or epilogue == EPI_DX else 1


def _configs(rows: list) -> list:
    out = []
    for row in ([_INTERPRETER_ROW] if INTERPRET else rows):
        cfg = triton.Config({"BLOCK_M": row[1], "BLOCK_N": row[2], "BLOCK_K": row[3], "GROUP_M": 8},
                            num_warps=row[4], num_stages=row[5])
        cfg.fits = row     # read by admitted()
        out.append(cfg)
    return out


GEMM_CONFIGS = _configs(_ROWS)


def admitted(configs: list, dtype: str, mask_a: bool, epilogue: int, arch: int) -> list:
    """The candidates that fit this dtype ("fp16", "bf16", "fp32"), GEMM variant and arch (80, 90)."""
    cls = "fp32" if dtype == "fp32" else "16bit"
    level = variant_level(mask_a, epilogue)
    return [c for c in configs if c.fits[0] in (cls, "any") and level <= c.fits[6 if arch < 90 else 7]]


def _prune(configs, named_args, **kwargs):
    a = named_args["A"]
    return select_configs(admitted(configs, dtype_name(a.dtype), kwargs["MASK_A"], kwargs["EPILOGUE"], arch_of(a)))


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------
@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "EPILOGUE", "MASK_A"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _ista_gemm_kernel(
    A, GATE, G, B, C, E1, E2,        # A, GATE, G: (M, K); B: (K, N) strided; C, E1, E2: (M, N); rows contiguous
    M, N, K, s_bk, s_bn,
    eta, eta_lambd,
    MASK_A: tl.constexpr,            # A <- A * (GATE > 0), stored to G by the pid_n == 0 programs
    EPILOGUE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
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
    GATE += row0 * K
    G += row0 * K
    C += row0 * N
    E1 += row0 * N
    E2 += row0 * N
    rows = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rows < M - row0, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_off = rows[:, None] * K + offs_k[None, :]
        a_mask = mask_m[:, None] & (offs_k[None, :] < K)
        a = tl.load(A + a_off, mask=a_mask, other=0.0)
        if MASK_A:
            gate = tl.load(GATE + a_off, mask=a_mask, other=0.0)
            a = tl.where(gate > 0, a, 0.0).to(a.dtype)
            tl.store(G + a_off, a, mask=a_mask & (pid_n == 0))
        b = tl.load(B + offs_k[:, None] * s_bk + offs_n[None, :] * s_bn,
                    mask=(offs_k[:, None] < K) & mask_n[None, :], other=0.0)
        acc = dot(a, b, acc, INTERP_BF16, PRECISION)

    c_off = rows[:, None] * N + offs_n[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    e1 = tl.load(E1 + c_off, mask=c_mask, other=0.0).to(tl.float32)
    if EPILOGUE == 1:    # out = relu(x + eta x A - eta lambda);  E1 = x
        acc = tl.maximum(e1 + eta * acc - eta_lambd, 0.0)
    else:                # dx = g + eta g A^T;  g = dout * (out > 0), E1 = dout, E2 = out
        e2 = tl.load(E2 + c_off, mask=c_mask, other=0.0)
        acc = tl.where(e2 > 0, e1, 0.0) + eta * acc
    tl.store(C + c_off, cast(acc, C.dtype.element_ty, INTERP_BF16), mask=c_mask)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def _gemm(a: torch.Tensor, w: torch.Tensor, transpose_w: bool, epilogue: int, e1=None, e2=None,
          gate=None, eta: float = 0.0, eta_lambd: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """C = epilogue(a' @ (W^T if transpose_w else W)), a' = a * (gate > 0) if gate is given.

    Returns C and, with a gate, the gated a' (stored by the kernel as it streams a)."""
    M, K = a.shape
    N = w.shape[0]
    c = torch.empty(M, N, device=a.device, dtype=a.dtype)
    g = torch.empty_like(a) if gate is not None else None
    s_bk, s_bn = (w.stride(1), w.stride(0)) if transpose_w else (w.stride(0), w.stride(1))
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    launch(_ista_gemm_kernel)[grid](
        a, gate if gate is not None else a, g if g is not None else a, w, c,
        e1 if e1 is not None else c, e2 if e2 is not None else c,
        M, N, K, s_bk, s_bn, eta, eta_lambd,
        MASK_A=gate is not None, EPILOGUE=epilogue,
        INTERP_BF16=interp_bf16(a.dtype), PRECISION=dot_precision(a.dtype))
    return c, g


def _ista_forward(x: torch.Tensor, w: torch.Tensor, eta: float, lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    a = ista_operator(w).to(x.dtype)                                             # A = W - W^T W
    out, _ = _gemm(x, a, False, EPI_ISTA, e1=x, eta=eta, eta_lambd=eta * lambd)  # relu(x + eta x A - eta lam)
    return out, a


def _ista_backward(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                   eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    dx, g = _gemm(dout, a, True, EPI_DX, e1=dout, e2=out, gate=out, eta=eta)   # g + eta g A^T, and g
    p = torch.mm(x.t(), g).to(w.dtype)                                          # x^T g (cuBLAS split-K)
    dw = torch.addmm(p, w, p + p.t(), alpha=-1.0).mul_(eta)                      # eta (P - W (P + P^T))
    return dx, dw


# ------------------------------------------------------------------------------------------------
# torch.library ops + autograd
# ------------------------------------------------------------------------------------------------
@register_op("crate_fast::ista_fwd")
def ista_fwd(x: torch.Tensor, w: torch.Tensor, eta: float, lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _ista_forward(x, w, eta, lambd)


@ista_fwd.register_fake
def _(x, w, eta, lambd):
    return torch.empty_like(x), w.new_empty(w.shape, dtype=x.dtype)


@register_op("crate_fast::ista_bwd")
def ista_bwd(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
             eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _ista_backward(x, w, a, out, dout, eta)


@ista_bwd.register_fake
def _(x, w, a, out, dout, eta):
    return torch.empty_like(x), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    x, w, eta, _ = inputs
    out, a = output
    ctx.save_for_backward(x, w, a, out)
    ctx.eta = eta
    ctx.mark_non_differentiable(a)


def _backward(ctx, dout, _da):
    x, w, a, out = ctx.saved_tensors
    dx, dw = ista_bwd(x, w, a, out, dout.contiguous(), ctx.eta)
    return dx, dw, None, None


ista_fwd.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------------
# Public function
# ------------------------------------------------------------------------------------------------
def ista_step_triton(x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1,
                     lambd: float = 0.1) -> torch.Tensor:
    """x: (..., C), weight: (C, C) -> (..., C) on the fused kernels; computes in x's dtype."""
    check_tensor(x, "ista_step")
    check_tensor(weight, "ista_step weight")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    return ista_fwd(x2, weight.contiguous(), float(step_size), float(lambd))[0].view(shape)
