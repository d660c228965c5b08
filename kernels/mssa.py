"""Fused tied-QKV attention for CRATE's MSSA in Triton: O = softmax(scale * w w^T) w, per (batch, head).

q = k = v = w, so every tile of w loaded from memory serves as query, key and value at once.

Forward (FlashAttention-style online softmax): one program per (query block, batch*head) streams the
key/value tiles of the same w, keeps O in registers and stores O plus the row log-sum-exp.

Backward, one kernel and no atomics. With P = softmax rows, delta_i = rowsum(dO_i * O_i):
    dw_j = sum_i P[i,j]^T dO_i  +  scale * sum_i (dS[i,j]^T + dS[j,i]) w_i
    dS[i,j] = P[i,j] (dP[i,j] - delta_i),  dP[i,j] = dO_i w_j^T
Because w w^T is symmetric, one score tile S[j,i] = w_j w_i^T gives both P[j,i] (softmax row j) and
P[i,j]^T (softmax row i). So the program that owns token block j computes its dK + dV *and* its dQ in a
single sweep over i: 5 tile GEMMs per (i, j) pair, against 7 in a FlashAttention-2 backward (which
recomputes S in separate dK/dV and dQ loops), and stores dw_j = dQ_j + dK_j + dV_j once.

Any N (tails masked), head dims up to 128 (48 is padded to 64 inside the kernel by masked loads),
fp32 / fp16 / bf16 with fp32 accumulation, strided inputs (the model's head split is a view).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._triton import (
    INTERPRET,
    ConfigRow,
    admitted,
    arch_of,
    call,
    cast,
    configs,
    dot,
    dot_precision,
    dtype_name,
    interp_bf16,
    launch,
    op_with_twin,
    select_configs,
    traced_op,
    tracing,
)

LOG2E = 1.4426950408889634
HEAD_BLOCKS = (16, 32, 64, 128)     # head dims are padded up to one of these inside the kernels
DELTA_BLOCK_M = 16 if INTERPRET else 64


# ------------------------------------------------------------------------------------------------
# Autotune candidates. The short-sequence regime (N ~ 65-257) is what CRATE runs, so small key blocks
# (less padding waste at N = 197) are in every table. fp32 runs IEEE fp32 dots (FMA, no tensor cores)
# whose operands take far more registers: small tiles, and a single backward loop.
# Columns (ConfigRow): dtypes, blocks, warps, stages, and the largest head block that compiles without
# spills on sm_80 and on sm_90a (max_head_block_sm80, max_head_block_sm90).
# ------------------------------------------------------------------------------------------------
_FWD_ROWS = [
    ConfigRow("16bit", dict(BLOCK_M=64, BLOCK_N=64), 4, 2, 64, 128),
    ConfigRow("16bit", dict(BLOCK_M=64, BLOCK_N=32), 4, 3, 64, 128),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=64), 8, 2, 128, 128),
    ConfigRow("16bit", dict(BLOCK_M=128, BLOCK_N=32), 8, 3, 128, 128),
    ConfigRow("16bit", dict(BLOCK_M=64, BLOCK_N=16), 4, 2, 64, 128),
    ConfigRow("16bit", dict(BLOCK_M=32, BLOCK_N=32), 4, 2, 128, 128),
    ConfigRow("fp32", dict(BLOCK_M=16, BLOCK_N=16), 8, 1, 64, 64),
    ConfigRow("fp32", dict(BLOCK_M=32, BLOCK_N=16), 4, 2, 64, 32),
    ConfigRow("fp32", dict(BLOCK_M=32, BLOCK_N=32), 4, 2, 32, 16),
]
_BWD_ROWS = [
    ConfigRow("16bit", dict(BLOCK_J=64, BLOCK_I=16), 4, 2, 64, 128),
    ConfigRow("16bit", dict(BLOCK_J=128, BLOCK_I=32), 8, 2, 64, 128),
    ConfigRow("16bit", dict(BLOCK_J=64, BLOCK_I=32), 4, 2, 64, 128),
    ConfigRow("16bit", dict(BLOCK_J=128, BLOCK_I=16), 8, 2, 128, 128),
    ConfigRow("16bit", dict(BLOCK_J=64, BLOCK_I=64), 4, 2, 64, 64),
    ConfigRow("16bit", dict(BLOCK_J=32, BLOCK_I=32), 4, 2, 128, 128),
    ConfigRow("fp32", dict(BLOCK_J=16, BLOCK_I=16), 4, 1, 64, 64),
    ConfigRow("fp32", dict(BLOCK_J=16, BLOCK_I=16), 8, 1, 64, 64),
    ConfigRow("fp32", dict(BLOCK_J=32, BLOCK_I=16), 4, 2, 32, 32),
]
FWD_CONFIGS = configs(_FWD_ROWS, ConfigRow("any", dict(BLOCK_M=32, BLOCK_N=16), 4, 1, 128, 128))
BWD_CONFIGS = configs(_BWD_ROWS, ConfigRow("any", dict(BLOCK_J=32, BLOCK_I=16), 4, 1, 128, 128))


def _prune(configs, named_args, **kwargs):
    w = named_args["W"]
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    return select_configs(admitted(configs, dtype_name(w.dtype), arch_of(w), block_d))


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------
@triton.jit
def _load_rows(base, rows, offs_d, stride, N, D, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile of a (N, D) head slice; rows >= N and padded head columns read as 0."""
    ptrs = base + rows[:, None] * stride + offs_d[None, :]
    if MASK_ROWS:
        if EVEN_D:
            return tl.load(ptrs, mask=rows[:, None] < N, other=0.0)
        return tl.load(ptrs, mask=(rows[:, None] < N) & (offs_d[None, :] < D), other=0.0)
    if EVEN_D:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _fwd_block(q, m_i, l_i, acc, W, start, offs_d, s_wn, N, D, qk_scale, BLOCK_N: tl.constexpr,
               MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over key block [start, start + BLOCK_N): the tile is key AND value."""
    offs_n = start + tl.arange(0, BLOCK_N)
    kv = _load_rows(W, offs_n, offs_d, s_wn, N, D, MASK_ROWS, EVEN_D)
    s = dot(q, tl.trans(kv), None, INTERP_BF16, PRECISION)                 # raw scores (BLOCK_M, BLOCK_N)
    if MASK_ROWS:                                                           # only the last block has a tail
        s = tl.where(offs_n[None, :] < N, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    # Non-finite scores, as the reference's softmax treats them. A row whose scores so far are all -inf
    # (keys holding an Inf of the other sign) keeps m = -inf: shift it by 0, so its p and alpha are
    # exp(-inf) = 0 rather than exp(-inf + inf) = NaN. A +inf score makes its p, hence l and the row, NaN
    # (softmax of +inf); so does a NaN score, whatever the max made of it (maxnum on a GPU skips NaN).
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(s * qk_scale - m_shift[:, None])                            # one FMA + EX2 per score
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = dot(cast(p, kv.dtype, INTERP_BF16), kv, acc * alpha[:, None], INTERP_BF16, PRECISION)
    return m_new, l_i, acc


@triton.autotune(configs=FWD_CONFIGS, key=["N", "D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _mssa_fwd_kernel(
    W, O, LSE,                                   # w, o: (B, H, N, D) strided, last stride 1; lse: (B*H, N)
    s_wb, s_wh, s_wn, s_ob, s_oh, s_on,
    H, N, D, qk_scale,                           # qk_scale = scale * log2(e) > 0: softmax in base 2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    qk_scale = tl.cast(qk_scale, tl.float32)     # torch.compile passes Python floats as fp64
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    W += b.to(tl.int64) * s_wb + h.to(tl.int64) * s_wh
    O += b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)               # head dim 48 -> BLOCK_D 64: zero padding, no copy
    q = _load_rows(W, offs_m, offs_d, s_wn, N, D, True, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = N - N % BLOCK_N
    for start in range(0, n_full, BLOCK_N):      # full blocks: no masks
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, W, start, offs_d, s_wn, N, D, qk_scale, BLOCK_N, False, EVEN_D,
                                   INTERP_BF16, PRECISION)
    if n_full < N:                               # the tail (N = 197: 5 keys with BLOCK_N = 64)
        m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, W, n_full, offs_d, s_wn, N, D, qk_scale, BLOCK_N, True, EVEN_D,
                                   INTERP_BF16, PRECISION)

    mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    tl.store(O + offs_m[:, None] * s_on + offs_d[None, :], cast(acc / l_i[:, None], O.dtype.element_ty, INTERP_BF16),
             mask=mask)
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


@triton.jit
def _mssa_bwd_delta_kernel(
    O, DO, DELTA,                                # delta_i = rowsum(O_i * dO_i): (B*H, N) fp32
    s_ob, s_oh, s_on, s_db, s_dh, s_dn,
    H, N, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # delta_i = sum_k P[i,k] dP[i,k] = dO_i . O_i, from the stored (bf16) O as FlashAttention does.
    # Tied attention concentrates each row's mass on the diagonal, where dS_ii = P_ii (dP_ii - delta_i)
    # cancels, so O's rounding shows in dw: measured 1.1-1.5x plain PyTorch's bf16 error (the 2x rule
    # allows 2x). Summing P * dP over the row instead measured 0.6-0.95x, but costs 2 more tile GEMMs
    # (7 instead of 5 per backward); speed wins within the rule.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * s_ob + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + b.to(tl.int64) * s_db + h * s_dh + offs_m[:, None] * s_dn + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _bwd_tile(acc, w_j, do_j, lse_j, delta_j, w_i, do_i, lse_i, delta_i, qk_scale, scale,
              INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """Add token block i's contribution to dw_j = dV_j + dK_j + dQ_j (5 tile GEMMs).

    No masks: rows past N were loaded as zeros with lse = delta = 0. Every exponent below is <= 0
    (lse_i >= the diagonal score w_i.w_i * scale >= 0 for scale > 0), so p is in [0, 1], and the
    zero rows of w_i / do_i cancel whatever a padded row or column contributes. A NaN or Inf in w
    makes its own softmax row NaN (its diagonal score is non-finite), so the lse of that row and
    every dw of the head are NaN, as the reference's P^T dO: every program sweeps every row i.
    """
    st = dot(w_j, tl.trans(w_i), None, INTERP_BF16, PRECISION)              # raw S[j,i] = S[i,j]^T (BJ, BI)
    pt_ij = tl.exp2(st * qk_scale - lse_i[None, :])                         # P[i,j]^T (softmax rows i)
    p_ji = tl.exp2(st * qk_scale - lse_j[:, None])                          # P[j,i]   (softmax rows j)
    dpt_ij = dot(w_j, tl.trans(do_i), None, INTERP_BF16, PRECISION)         # dP[i,j]^T = w_j dO_i^T
    dp_ji = dot(do_j, tl.trans(w_i), None, INTERP_BF16, PRECISION)          # dP[j,i]  = dO_j w_i^T
    # dS[i,j]^T + dS[j,i]: the key-side and query-side score gradients of block j, summed.
    t = pt_ij * (dpt_ij - delta_i[None, :]) + p_ji * (dp_ji - delta_j[:, None])
    acc = dot(cast(pt_ij, w_i.dtype, INTERP_BF16), do_i, acc, INTERP_BF16, PRECISION)        # dV_j
    return dot(cast(t * scale, w_i.dtype, INTERP_BF16), w_i, acc, INTERP_BF16, PRECISION)   # + dK_j + dQ_j


@triton.jit
def _bwd_block(acc, w_j, do_j, lse_j, delta_j, W, DO, LSE, DELTA, start, offs_d, s_wn, s_dn, N, D, qk_scale, scale,
               BLOCK_I: tl.constexpr, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr, INTERP_BF16: tl.constexpr,
               PRECISION: tl.constexpr):
    """Load token block i = [start, start + BLOCK_I) and add its contribution to dw_j."""
    offs_i = start + tl.arange(0, BLOCK_I)
    w_i = _load_rows(W, offs_i, offs_d, s_wn, N, D, MASK_ROWS, EVEN_D)
    do_i = _load_rows(DO, offs_i, offs_d, s_dn, N, D, MASK_ROWS, EVEN_D)
    if MASK_ROWS:
        lse_i = tl.load(LSE + offs_i, mask=offs_i < N, other=0.0)
        delta_i = tl.load(DELTA + offs_i, mask=offs_i < N, other=0.0)
    else:
        lse_i = tl.load(LSE + offs_i)
        delta_i = tl.load(DELTA + offs_i)
    return _bwd_tile(acc, w_j, do_j, lse_j, delta_j, w_i, do_i, lse_i, delta_i, qk_scale, scale, INTERP_BF16,
                     PRECISION)


@triton.autotune(configs=BWD_CONFIGS, key=["N", "D"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _mssa_bwd_kernel(
    W, DO, LSE, DELTA, DW,                       # w, do, dw: (B, H, N, D) strided; lse, delta: (B*H, N)
    s_wb, s_wh, s_wn, s_db, s_dh, s_dn, s_dwb, s_dwh, s_dwn,
    H, N, D, qk_scale, scale,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    ONE_LOOP: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
):
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)   # fp64 under torch.compile
    pid_j = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    W += b.to(tl.int64) * s_wb + h.to(tl.int64) * s_wh
    DO += b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh
    LSE += bh.to(tl.int64) * N
    DELTA += bh.to(tl.int64) * N

    offs_d = tl.arange(0, BLOCK_D)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)          # the token block this program owns
    w_j = _load_rows(W, offs_j, offs_d, s_wn, N, D, True, EVEN_D)
    do_j = _load_rows(DO, offs_j, offs_d, s_dn, N, D, True, EVEN_D)
    lse_j = tl.load(LSE + offs_j, mask=offs_j < N, other=0.0)
    delta_j = tl.load(DELTA + offs_j, mask=offs_j < N, other=0.0)

    acc = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    if ONE_LOOP:     # fp32 (FMA dots, register-hungry): a second copy of the body would spill
        for start in range(0, N, BLOCK_I):
            acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, W, DO, LSE, DELTA, start, offs_d, s_wn, s_dn, N, D,
                             qk_scale, scale, BLOCK_I, True, EVEN_D, INTERP_BF16, PRECISION)
    else:
        n_full = N - N % BLOCK_I
        for start in range(0, n_full, BLOCK_I):  # full tiles: unmasked loads
            acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, W, DO, LSE, DELTA, start, offs_d, s_wn, s_dn, N, D,
                             qk_scale, scale, BLOCK_I, False, EVEN_D, INTERP_BF16, PRECISION)
        if n_full < N:                           # the tail tile
            acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, W, DO, LSE, DELTA, n_full, offs_d, s_wn, s_dn, N, D,
                             qk_scale, scale, BLOCK_I, True, EVEN_D, INTERP_BF16, PRECISION)

    mask = (offs_j[:, None] < N) & (offs_d[None, :] < D)
    tl.store(DW + b.to(tl.int64) * s_dwb + h.to(tl.int64) * s_dwh + offs_j[:, None] * s_dwn + offs_d[None, :],
             cast(acc, DW.dtype.element_ty, INTERP_BF16), mask=mask)


# Argument types for aot_check.py: pointers take the data dtype (LSE and DELTA are fp32), the named
# floats are scalars, and every stride is a multiple of 16 at CRATE's shapes (rows of H * D elements).
AOT_SPECS = {
    "_mssa_fwd_kernel": dict(ptr=["W", "O", "LSE"], fp32_ptr=["LSE"], floats=["qk_scale"],
                             div16=["s_wb", "s_wh", "s_wn", "s_ob", "s_oh", "s_on"]),
    "_mssa_bwd_delta_kernel": dict(ptr=["O", "DO", "DELTA"], fp32_ptr=["DELTA"], floats=[],
                                   div16=["s_ob", "s_oh", "s_on", "s_db", "s_dh", "s_dn"]),
    "_mssa_bwd_kernel": dict(ptr=["W", "DO", "LSE", "DELTA", "DW"], fp32_ptr=["LSE", "DELTA"],
                             floats=["qk_scale", "scale"],
                             div16=["s_wb", "s_wh", "s_wn", "s_db", "s_dh", "s_dn", "s_dwb", "s_dwh", "s_dwn"]),
}


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def _head_block(D: int) -> int:
    return next(b for b in HEAD_BLOCKS if b >= D)


def _mssa_forward(w: torch.Tensor, scale: float, traced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (B, H, N, D), last stride 1 -> o: (B, H, N, D) with w's strides, lse: (B*H, N) fp32 (base 2)."""
    B, H, N, D = w.shape
    o = torch.empty_like(w)            # same strides as w: the model's (B, N, H, D) memory layout
    lse = torch.empty(B * H, N, device=w.device, dtype=torch.float32)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]), B * H)  # noqa: E731
    launch(_mssa_fwd_kernel, traced)[grid](
        w, o, lse, *w.stride()[:3], *o.stride()[:3], H, N, D, scale * LOG2E,
        BLOCK_D=_head_block(D), EVEN_D=_head_block(D) == D,
        INTERP_BF16=interp_bf16(w.dtype), PRECISION=dot_precision(w.dtype))
    return o, lse


def _mssa_backward(w: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                   scale: float, traced: bool = False) -> torch.Tensor:
    """w, o, do: (B, H, N, D); lse: (B*H, N) from the forward -> dw: (B, H, N, D) with w's strides."""
    B, H, N, D = w.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    block_d = _head_block(D)
    launch(_mssa_bwd_delta_kernel, traced)[(triton.cdiv(N, DELTA_BLOCK_M), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, N, D, BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d)
    dw = torch.empty_like(w)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_J"]), B * H)  # noqa: E731
    launch(_mssa_bwd_kernel, traced)[grid](
        w, do, lse, delta, dw, *w.stride()[:3], *do.stride()[:3], *dw.stride()[:3],
        H, N, D, scale * LOG2E, scale, BLOCK_D=block_d, EVEN_D=block_d == D, ONE_LOOP=w.dtype == torch.float32,
        INTERP_BF16=interp_bf16(w.dtype), PRECISION=dot_precision(w.dtype))
    return dw


# ------------------------------------------------------------------------------------------------
# torch.library ops + autograd (torch.compile keeps them in its graph), and the eager twin
# ------------------------------------------------------------------------------------------------
# The backward launch as an op of its own, for graphs that trace the backward.
mssa_bwd = traced_op("crate_fast::mssa_bwd", _mssa_backward, fake=lambda w, o, lse, do, scale: torch.empty_like(w))


def _fake_forward(w, scale):
    B, H, N, _ = w.shape
    return torch.empty_like(w), w.new_empty(B * H, N, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    w, scale = inputs
    o, lse = output
    ctx.save_for_backward(w, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


@once_differentiable       # first-order only, as the torch path (torch_ops.py)
def _backward(ctx, do, _dlse):
    w, o, lse = ctx.saved_tensors
    backward = mssa_bwd if tracing(do) else _mssa_backward
    return backward(w, o, lse, do, ctx.scale), None


mssa_fwd, mssa_fwd_twin = op_with_twin("crate_fast::mssa_fwd", _mssa_forward, fake=_fake_forward,
                                     setup_context=_setup_context, backward=_backward)


# ------------------------------------------------------------------------------------------------
# Entry point, for the inputs mssa_attention admitted: CUDA (or the interpreter), fp32/fp16/bf16,
# head dim <= 128 (64 in fp32), scale > 0, non-empty
# ------------------------------------------------------------------------------------------------
def mssa_attention_triton(w: torch.Tensor, scale: float) -> torch.Tensor:
    """w: (B, H, N, D) -> (B, H, N, D) on the fused kernels. Attention dropout is not supported."""
    if w.stride(-1) != 1:
        w = w.contiguous()
    return call(mssa_fwd, mssa_fwd_twin, w, scale)[0]
