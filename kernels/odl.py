"""CRATE-alpha's ODL block in Triton: its four GEMMs, each with the block's elementwise work fused into
the epilogue.

The math (torch_ops.py, docs/DESIGN.md §2.2), tokens as rows, x: (M, d), D and D1: (d, m), m = 4d:
    kernel "a1"            a1  = relu(eta x D - eta lambda)       epilogue relu(eta acc - eta lambda)
    kernel "e"             e   = a1 D^T - x                       epilogue acc - x
    kernel "a2"            a2  = relu(a1 - eta e D - eta lambda)  epilogue relu(a1 - eta acc - eta lambda)
    kernel "out[_residual]" out = a2 D1^T (+ residual)            epilogue acc (+ residual), output dtype
One GEMM kernel with a constexpr EPILOGUE. Each intermediate is written once and read once, in the
compute dtype: a1 and a2 (M x m), e (M x d); the port's forward writes nine M x m tensors (each
elementwise op its own). Forming e = a1 D^T - x in the second epilogue (the port's own order) rather
than keeping p = x D from the first keeps p out of memory: the third epilogue reads a1 only.

The backward is torch_ops.odl_backward on cuBLAS, the torch path's own: it saves x_c and a2 (half the
port's saved bytes) and recomputes a1 and e there. (ista.py: a Triton GEMM with a ReLU gate fused into
its prologue measured 3x slower than where() + cuBLAS on an H100.)
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
from .torch_ops import odl_backward, odl_operands, odl_setup_context

# The epilogues, in launch order; the constexpr EPILOGUE names one.
EPILOGUES = ("a1", "e", "a2", "out", "out_residual")
# B is D as stored, (K, N) = (d, m), for "a1" and "a2"; the others read a (d, m) dictionary as its
# transpose, (K, N) = (m, d), i.e. stored (N, K).
B_TRANSPOSED = {"a1": False, "e": True, "a2": False, "out": True, "out_residual": True}

# ------------------------------------------------------------------------------------------------
# Autotune candidates (ConfigRow; no head dim: sm80/sm90 say whether the row compiles without spills
# for every epilogue, python -m crate_fast.kernels.aot_check). ISTA's GEMM rows plus a 64 x 128 tile.
# The 16-bit tiles above 64 x 64 stay SPILLS on sm_80, as in ISTA's table: under Triton 3.8 they fit
# (at most 215 registers), but so do ISTA's (254), whose marks hold for Triton 3.6 as well (ConfigRow),
# and 3.6 was not at hand to check these.
# ------------------------------------------------------------------------------------------------
_ROWS = [
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), warps=8, stages=3, sm80=SPILLS, sm90=FITS),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), warps=8, stages=4, sm80=SPILLS, sm90=FITS),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), warps=4, stages=4, sm80=SPILLS, sm90=FITS),
    ConfigRow("16bit", dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), warps=4, stages=4, sm80=SPILLS, sm90=FITS),
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
@triton.autotune(configs=GEMM_CONFIGS, key=["N", "K", "EPILOGUE"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _odl_gemm_kernel(
    A, B, X, OUT,            # A: (M, K); B: (K, N), or stored (N, K) when B_T; X (epilogue operand), OUT: (M, N)
    M, N, K,                 # every matrix contiguous (row stride K or N)
    eta, eta_lambd,
    EPILOGUE: tl.constexpr, B_T: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    eta, eta_lambd = tl.cast(eta, tl.float32), tl.cast(eta_lambd, tl.float32)   # fp64 under torch.compile
    pid_m, pid_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)   # grouped order, shared B panels in L2

    # 64-bit row offset once per program (M * m passes 2^31 at CRATE-alpha-L width from 131k tokens on);
    # 32-bit offsets inside the tile and in B (d * m < 2^31) keep the pointer tensors small (ista.py).
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
        mask_k = offs_k < K
        a = tl.load(A + rows[:, None] * K + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if B_T:
            b_off = offs_n[None, :] * K + offs_k[:, None]
        else:
            b_off = offs_k[:, None] * N + offs_n[None, :]
        b = tl.load(B + b_off, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = dot(a, b, acc, INTERP_BF16, PRECISION)

    c_off = rows[:, None] * N + offs_n[None, :]
    c_mask = mask_m[:, None] & mask_n[None, :]
    # The ReLUs use propagate_nan: a NaN pre-activation stays NaN, as torch's relu keeps it (the default
    # maxnum would return 0, turning a NaN input into a finite output).
    if EPILOGUE == "a1":
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


# ------------------------------------------------------------------------------------------------
# Launcher
# ------------------------------------------------------------------------------------------------
def _odl_forward(xc: torch.Tensor, dc: torch.Tensor, d1c: torch.Tensor, residual: torch.Tensor | None,
                 eta: float, lambd: float, traced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """xc: (M, d); dc, d1c: (d, m), all contiguous in one compute dtype; residual: (M, d) contiguous in
    any kernel dtype, or None -> (out (M, d) in the residual's dtype promoted with the compute dtype
    (the compute dtype without residual), a2 (M, m) in the compute dtype)."""
    M, d = xc.shape
    m = dc.shape[1]
    new = lambda n, dtype=xc.dtype: torch.empty(M, n, device=xc.device, dtype=dtype)  # noqa: E731
    a1, e, a2 = new(m), new(d), new(m)
    out_dtype = xc.dtype if residual is None else torch.promote_types(residual.dtype, xc.dtype)
    out = new(d, out_dtype)
    kernel = launch(_odl_gemm_kernel, traced)
    meta = dict(INTERP_BF16=interp_bf16(xc.dtype), PRECISION=dot_precision(xc.dtype))
    # (a operand, b operand, epilogue operand, output, epilogue); "a1" reads no epilogue operand and is
    # handed its own A operand, which it never loads.
    for a, b, x, c, epilogue in ((xc, dc, xc, a1, "a1"), (a1, dc, xc, e, "e"), (e, dc, a1, a2, "a2"),
                                 (a2, d1c, residual if residual is not None else a2, out,
                                  "out" if residual is None else "out_residual")):
        N, K = c.shape[1], a.shape[1]
        grid = lambda META, N=N: (triton.cdiv(M, META["BLOCK_M"]) * triton.cdiv(N, META["BLOCK_N"]),)  # noqa: E731
        kernel[grid](a, b, x, c, M, N, K, eta, eta * lambd, EPILOGUE=epilogue, B_T=B_TRANSPOSED[epilogue], **meta)
    return out, a2


# ------------------------------------------------------------------------------------------------
# torch.library op and its eager twin, both with torch_ops' autograd of the step (plain torch ops in
# the backward, so torch.compile can fuse them)
# ------------------------------------------------------------------------------------------------
@register_op("crate_fast::odl_fwd")
def odl_fwd(xc: torch.Tensor, dc: torch.Tensor, d1c: torch.Tensor, residual: torch.Tensor | None, eta: float,
            lambd: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _odl_forward(xc, dc, d1c, residual, eta, lambd, traced=True)


@odl_fwd.register_fake
def _(xc, dc, d1c, residual, eta, lambd):
    out_dtype = xc.dtype if residual is None else torch.promote_types(residual.dtype, xc.dtype)
    return xc.new_empty(xc.shape, dtype=out_dtype), xc.new_empty(xc.shape[0], dc.shape[1])


odl_fwd.register_autograd(odl_backward, setup_context=odl_setup_context)


class _ODLTriton(torch.autograd.Function):
    """odl_fwd and its autograd for eager calls, without the torch.library dispatch (see register_op)."""

    # forward(ctx, ...) calls the shared setup itself (a separate setup_context costs an
    # inspect.signature bind per call, torch_ops._ISTAApply).
    @staticmethod
    def forward(ctx, xc, dc, d1c, residual, eta, lambd):
        out = _odl_forward(xc, dc, d1c, residual, eta, lambd)
        odl_setup_context(ctx, (xc, dc, d1c, residual, eta, lambd), out)
        return out

    backward = staticmethod(odl_backward)


# ------------------------------------------------------------------------------------------------
# Entry point, for the inputs odl_step admitted: CUDA (or the interpreter), the compute and residual
# dtypes fp32/fp16/bf16, non-empty
# ------------------------------------------------------------------------------------------------
def odl_step_triton(x: torch.Tensor, D: torch.Tensor, D1: torch.Tensor, step_size: float, lambd: float,
                    residual: torch.Tensor | None, compute_dtype: torch.dtype) -> torch.Tensor:
    """x: (..., d); D, D1: (d, m); residual: x's shape or None -> (..., d) (odl_step_torch's dtypes);
    the GEMMs run in compute_dtype."""
    with torch.autocast(x.device.type, enabled=False):      # the operands are cast as autocast would
        operands = odl_operands(x, D, D1, residual, compute_dtype)     # the kernels read whole rows
        if torch.compiler.is_compiling():
            out, _ = odl_fwd(*operands, step_size, lambd)
        else:
            out, _ = _ODLTriton.apply(*operands, step_size, lambd)
    return out.view(x.shape)
