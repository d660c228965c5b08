"""One Triton GEMM with its caller's elementwise work fused into the epilogue: ISTA's step (ista.py) and
the four GEMMs of CRATE-alpha's ODL block (odl.py).

out = epilogue(acc) with acc = LHS RHS: LHS (M, K); RHS (K, N), or stored (N, K) and read as its
transpose; X (the epilogue operand) and OUT (M, N). The constexpr EPILOGUE names one (eta: step size):
    "ista"          relu(x + eta acc - eta lambda)   ISTA:  LHS x_c, RHS the operator A_c, X the residual x
    "a1"            relu(eta acc - eta lambda)       ODL:   a1  = relu(eta x D - eta lambda)        (no X)
    "e"             acc - x                          ODL:   e   = a1 D^T - x
    "a2"            relu(x - eta acc - eta lambda)   ODL:   a2  = relu(a1 - eta e D - eta lambda)   (X = a1)
    "out"           acc                              ODL:   out = a2 D1^T                           (no X)
    "out_residual"  acc + x                          ODL:   out = a2 D1^T + residual
Every matrix is contiguous. X and OUT of "ista" and "out_residual" are the residual stream in its own
dtype (fp32 under autocast: the official code and the port add a 16-bit GEMM to the fp32 stream); the
other epilogues read and write the GEMM dtype. Each output is written once and no pre-activation is
stored.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import (
    ConfigRow,
    admitted,
    arch_of,
    cast,
    configs,
    dot,
    dot_precision,
    dtype_name,
    fits,
    grouped_tile,
    interp_bf16,
    launch,
    select_configs,
)

EPILOGUES = ("ista", "a1", "e", "a2", "out", "out_residual")
RHS_TRANSPOSED = ("e", "out", "out_residual")     # ODL's D and D1 (d, m) serve as (K, N) = (m, d)
STREAM_EPILOGUES = ("ista", "out_residual")       # X and OUT in the residual stream's dtype

# ------------------------------------------------------------------------------------------------
# Autotune candidates: the union of the former ISTA and ODL kernels' tables. No head dim: fits() marks
# the archs on which a row compiles without spills for every epilogue, dtype and stream dtype: every row
# compiled by aot_check.run_job under Triton 3.6.0 and 3.8.0 (on sm_80 with fp64 scalars too, as
# torch.compile passes them). Every 16-bit row fits both archs (at most 252 registers on sm_80: 128 x 64
# w4s4, "ista" with an fp32 stream, Triton 3.6); the fp32 64 x 64 x 64 row spills on sm_80 (16 bytes
# under 3.6, up to 15800 under 3.8). (The former ISTA kernel, with a strided operand, spilled its 16-bit
# tiles above 64 x 64 on sm_80 under Triton 3.6.)
# ------------------------------------------------------------------------------------------------
ROWS = [
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), warps=8, stages=3, **fits(sm80=True, sm90=True)),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), warps=8, stages=4, **fits(sm80=True, sm90=True)),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), warps=8, stages=2, **fits(sm80=True, sm90=True)),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), warps=4, stages=4, **fits(sm80=True, sm90=True)),
    ConfigRow("16bit", dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), warps=4, stages=4, **fits(sm80=True, sm90=True)),
    ConfigRow("16bit", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), warps=4, stages=4, **fits(sm80=True, sm90=True)),
    ConfigRow("16bit", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), warps=4, stages=3, **fits(sm80=True, sm90=True)),
    ConfigRow("fp32", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), warps=4, stages=4, **fits(sm80=False, sm90=True)),
    ConfigRow("fp32", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), warps=4, stages=2, **fits(sm80=True, sm90=True)),
    ConfigRow("fp32", dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32), warps=4, stages=2, **fits(sm80=True, sm90=True)),
]
GEMM_CONFIGS = configs(ROWS, ConfigRow("any", dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32), warps=4, stages=1,
                                       **fits(sm80=True, sm90=True)), GROUP_M=8)


def _prune(configs, named_args, **kwargs):
    lhs = named_args["LHS"]
    return select_configs(admitted(configs, dtype_name(lhs.dtype), arch_of(lhs)))


# ------------------------------------------------------------------------------------------------
# Kernel
# ------------------------------------------------------------------------------------------------
@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "EPILOGUE"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _gemm_epilogue_kernel(
    LHS, RHS, X, OUT,        # LHS: (M, K); RHS: (K, N), or stored (N, K) when RHS_T; X, OUT: (M, N)
    M, N, K,                 # every matrix contiguous (row stride K or N)
    eta, eta_lambd,
    EPILOGUE: tl.constexpr, RHS_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    eta, eta_lambd = tl.cast(eta, tl.float32), tl.cast(eta_lambd, tl.float32)   # fp64 under torch.compile
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)   # grouped order, shared RHS panels in L2

    # A 64-bit row offset once per program (M * N passes 2^31: at CRATE-alpha-L width from 131k tokens
    # on); 32-bit offsets inside the tile and in RHS (K * N < 2^31) keep the pointer tensors small (full
    # 64-bit 2D offsets cost ~2 registers per element and spilled).
    row0 = (pid_m * BLOCK_M).to(tl.int64)
    LHS += row0 * K
    X += row0 * N
    OUT += row0 * N
    rows = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = rows < M - row0, offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(LHS + rows[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if RHS_T:
            b_off = offs_n[None, :] * K + offs_k[:, None]
        else:
            b_off = offs_k[:, None] * N + offs_n[None, :]
        b = tl.load(RHS + b_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot(a, b, acc, INTERP_BF16, PRECISION)

    c_off = rows[:, None] * N + offs_n[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    # The ReLUs use propagate_nan: a NaN pre-activation stays NaN, as torch's relu keeps it (the default
    # maxnum would return 0, turning a NaN input into a finite output).
    if EPILOGUE == "ista":
        x = tl.load(X + c_off, mask=c_mask, other=0.0).to(tl.float32)
        out = tl.maximum(x + eta * acc - eta_lambd, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif EPILOGUE == "a1":
        out = tl.maximum(eta * acc - eta_lambd, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif EPILOGUE == "e":
        out = acc - tl.load(X + c_off, mask=c_mask, other=0.0).to(tl.float32)
    elif EPILOGUE == "a2":
        a1 = tl.load(X + c_off, mask=c_mask, other=0.0).to(tl.float32)
        out = tl.maximum(a1 - eta * acc - eta_lambd, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif EPILOGUE == "out_residual":
        out = acc + tl.load(X + c_off, mask=c_mask, other=0.0).to(tl.float32)
    else:
        out = acc
    tl.store(OUT + c_off, cast(out, OUT.dtype.element_ty, INTERP_BF16), mask=c_mask)


# Argument types for aot_check.py: pointers take the GEMM dtype (X and OUT of STREAM_EPILOGUES also
# fp32), eta and eta_lambd are float scalars, N and K multiples of 16 at CRATE's widths.
AOT_SPECS = {
    "_gemm_epilogue_kernel": dict(ptr=["LHS", "RHS", "X", "OUT"], fp32_ptr=[], floats=["eta", "eta_lambd"],
                                  div16=["N", "K"]),
}


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------
def gemm_epilogue(lhs: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor | None, epilogue: str, eta: float,
                  lambd: float, out_dtype: torch.dtype, traced: bool = False) -> torch.Tensor:
    """epilogue(lhs rhs) (module docstring). lhs: (M, K); rhs: (K, N), or (N, K) for the epilogues in
    RHS_TRANSPOSED; x: (M, N), or None for "a1" and "out"; all contiguous -> (M, N) in out_dtype.
    traced: launched from a torch.library op (_triton.launch)."""
    rhs_t = epilogue in RHS_TRANSPOSED
    M, K = lhs.shape
    N = rhs.shape[0] if rhs_t else rhs.shape[1]
    out = torch.empty(M, N, device=lhs.device, dtype=out_dtype)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
    launch(_gemm_epilogue_kernel, traced)[grid](
        lhs, rhs, lhs if x is None else x, out, M, N, K, eta, eta * lambd,   # no X: lhs stands in, unread
        EPILOGUE=epilogue, RHS_T=rhs_t, INTERP_BF16=interp_bf16(lhs.dtype), PRECISION=dot_precision(lhs.dtype))
    return out
