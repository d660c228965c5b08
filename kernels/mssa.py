"""Fused tied-QKV attention for CRATE's MSSA in Triton: O = softmax(scale * w w^T) w, per (batch, head),
full or causal (query i attends to keys j <= i: CRATE-GPT).

q = k = v = w, so every tile of w loaded from memory serves as query, key and value at once.

Forward (FlashAttention-style online softmax): one program per (query block, batch*head) streams the
key/value tiles of the same w, keeps O in registers and stores O plus the row log-sum-exp. Causal: a
query block reads the keys up to its own last row only (the tiles left of the diagonal unmasked, the
diagonal ones under the mask); every tile above the diagonal is skipped, half the N^2 work.

Backward, one kernel and no atomics. With P = softmax rows, delta_i = rowsum(dO_i * O_i):
    dw_j = sum_i P[i,j]^T dO_i  +  scale * sum_i (dS[i,j]^T + dS[j,i]) w_i
    dS[i,j] = P[i,j] (dP[i,j] - delta_i),  dP[i,j] = dO_i w_j^T
Because w w^T is symmetric, one score tile S[j,i] = w_j w_i^T gives both P[j,i] (softmax row j) and
P[i,j]^T (softmax row i). So the program that owns token block j computes its dK + dV *and* its dQ in a
single sweep over i: 5 tile GEMMs per (i, j) pair, against 7 in a FlashAttention-2 backward (which
recomputes S in separate dK/dV and dQ loops), and stores dw_j = dQ_j + dK_j + dV_j once.

Causal backward, the same sweep. P[i,j] = 0 unless j <= i, so for the program owning block j:
    partner blocks i left of the diagonal (i < j): only block j's rows as queries are live, dQ_j:
        S[j,i], dP[j,i] = dO_j w_i^T, dS[j,i] w_i                                  3 tile GEMMs
    partner blocks i right of it (i > j): only block j as keys, dK_j + dV_j:
        S[j,i] (= S[i,j]^T), dP[i,j]^T = w_j dO_i^T, P[i,j]^T dO_i, dS[i,j]^T w_i    4 tile GEMMs
    the diagonal tiles: all 5, each side under its mask (key side j <= i, query side i <= j).
Work, one unit = one tile GEMM over all N x N (i, j) pairs: half the pairs at 3, half at 4, so 3.5 N^2
against 5 N^2 non-causal (70%). A FlashAttention-2 layout with an atomic dQ does 2.5 N^2: program j
visits only its live pairs (i >= j) with 5 GEMMs (S, dP, dV, dK and dQ_i) and adds dQ_i into other
programs' rows with fp32 atomics (a dQ buffer, a cast pass, a run-to-run varying summation order);
without atomics its dQ needs a second sweep recomputing S and dP (Triton's tutorial layout), 3.5 N^2
again. This kernel chooses determinism (the same dw bits every run, as the non-causal kernel, one store
per element) for 1.4x the floor's matrix work: S and dP of each off-diagonal pair are computed twice,
once by each of the pair's programs. fp32 (FMA dots, register-hungry: ONE_LOOP) runs the diagonal tile's
body on every pair instead, 5 N^2 as non-causal: every split fp32 variant tried spilled (aot_check).

Non-finite values in causal attention (the reference's masked softmax multiplies masked zeros): a NaN
or Inf in w[k, c] makes out[i, c] NaN for every i < k (0 * NaN in attn @ w), and one in dO[k, c] makes
dw[j, c] NaN for every j > k (0 * NaN in attn^T dO). Skipped tiles cannot see them, so a small pass
(_mssa_nonfinite_rows_kernel, one program per head) finds the last row of w and the first row of dO
with a non-finite value per column, and the epilogues store NaN there: the reference's pattern at the
cost of one read of w (forward) and of dO (backward), and one launch each. A non-finite w already makes
every dw of its head NaN, as in the reference (each program meets that row's NaN softmax row or a
0 * Inf product). One difference, causal or not: for a lone +-Inf in dO, delta = dO_i . O_i
(FlashAttention's) is +-Inf where the reference's rowsum(P dP) sums Infs of both signs (or 0 * Inf) to
NaN, so dw is non-finite exactly where the reference's is, but NaN and +-Inf can trade places (tested).

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
DELTA_BLOCK_M = 16 if INTERPRET else 64      # rows per program of the delta pass, and per step of the
                                             # non-finite scan


# ------------------------------------------------------------------------------------------------
# Autotune candidates. The short-sequence regime (N ~ 65-257) is what CRATE runs, so small key blocks
# (less padding waste at N = 197) are in every table. fp32 runs IEEE fp32 dots (FMA, no tensor cores)
# whose operands take far more registers: small tiles, and a single backward loop. Causal kernels step
# from a block's diagonal in whole tiles: BLOCK_M is a multiple of BLOCK_N, BLOCK_J of BLOCK_I (tested).
# Columns (ConfigRow): dtypes, blocks, warps, stages, and the largest head block that compiles without
# spills on sm_80 and on sm_90a (max_head_block_sm80, max_head_block_sm90); causal_limits, lower ones for
# the causal kernels (their masks cost registers: 64 x 64 backward tiles spill at head block 64 on sm_80).
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
    ConfigRow("16bit", dict(BLOCK_J=64, BLOCK_I=64), 4, 2, 64, 64, causal_limits=(32, 64)),
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
    causal = kwargs.get("CAUSAL", named_args.get("CAUSAL"))
    return select_configs(admitted(configs, dtype_name(w.dtype), arch_of(w), block_d, causal=causal))


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
def _fwd_block(q, m_i, l_i, acc, W, start, offs_m, offs_d, s_wn, N, D, qk_scale, BLOCK_N: tl.constexpr,
               MASK_ROWS: tl.constexpr, DIAGONAL: tl.constexpr, EVEN_D: tl.constexpr, INTERP_BF16: tl.constexpr,
               PRECISION: tl.constexpr):
    """One online-softmax step over key block [start, start + BLOCK_N): the tile is key AND value.
    MASK_ROWS: the block may reach past N; DIAGONAL: it crosses the causal diagonal (keys j > i masked)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    kv = _load_rows(W, offs_n, offs_d, s_wn, N, D, MASK_ROWS, EVEN_D)
    s = dot(q, tl.trans(kv), None, INTERP_BF16, PRECISION)                 # raw scores (BLOCK_M, BLOCK_N)
    if DIAGONAL:                 # j <= i, which for every stored row i < N also keeps j < N
        s = tl.where(offs_n[None, :] <= offs_m[:, None], s, float("-inf"))
    elif MASK_ROWS:              # only the last block has a tail
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


@triton.autotune(configs=FWD_CONFIGS, key=["N", "D", "CAUSAL"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _mssa_fwd_kernel(
    W, O, LSE, LAST,                             # w, o: (B, H, N, D) strided, last stride 1; lse: (B*H, N);
    s_wb, s_wh, s_wn, s_ob, s_oh, s_on,          # last: (B*H, BLOCK_D) int32, read only if CAUSAL
    H, N, D, qk_scale,                           # qk_scale = scale * log2(e) > 0: softmax in base 2
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
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
    if CAUSAL:
        m0 = pid_m * BLOCK_M                     # < N, a multiple of BLOCK_N
        for start in range(0, m0, BLOCK_N):      # left of the diagonal: every key j < m0 <= i, no masks
            m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, W, start, offs_m, offs_d, s_wn, N, D, qk_scale, BLOCK_N,
                                       False, False, EVEN_D, INTERP_BF16, PRECISION)
        for start in range(m0, tl.minimum(m0 + BLOCK_M, N), BLOCK_N):     # the diagonal, up to the last row
            m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, W, start, offs_m, offs_d, s_wn, N, D, qk_scale, BLOCK_N,
                                       True, True, EVEN_D, INTERP_BF16, PRECISION)
    else:
        n_full = N - N % BLOCK_N
        for start in range(0, n_full, BLOCK_N):  # full blocks: no masks
            m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, W, start, offs_m, offs_d, s_wn, N, D, qk_scale, BLOCK_N,
                                       False, False, EVEN_D, INTERP_BF16, PRECISION)
        if n_full < N:                           # the tail (N = 197: 5 keys with BLOCK_N = 64)
            m_i, l_i, acc = _fwd_block(q, m_i, l_i, acc, W, n_full, offs_m, offs_d, s_wn, N, D, qk_scale, BLOCK_N,
                                       True, False, EVEN_D, INTERP_BF16, PRECISION)

    mask = (offs_m[:, None] < N) & (offs_d[None, :] < D)
    o_ptrs = O + offs_m[:, None] * s_on + offs_d[None, :]
    tl.store(o_ptrs, cast(acc / l_i[:, None], O.dtype.element_ty, INTERP_BF16), mask=mask)
    if CAUSAL:
        # The reference's 0 * NaN: a non-finite w[k, c] of a skipped key k > i makes out[i, c] NaN. A
        # second, predicated store (after the first, in the same thread: it wins), so that no register
        # holds the tile for a select (which spilled some configs).
        last = tl.load(LAST + bh.to(tl.int64) * BLOCK_D + offs_d)
        tl.store(o_ptrs, cast(tl.full([BLOCK_M, BLOCK_D], float("nan"), tl.float32), O.dtype.element_ty, INTERP_BF16),
                 mask=mask & (last[None, :] > offs_m[:, None]))
    tl.store(LSE + bh.to(tl.int64) * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


@triton.jit
def _mssa_nonfinite_rows_kernel(
    X, OUT,                                      # x: (B, H, N, D) strided, last stride 1; out: (B*H, BLOCK_D) int32
    s_xb, s_xh, s_xn,
    H, N, D,
    LAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Per column c of one head: the last (LAST) or first row k with a NaN or +-Inf in x[k, c], else -1
    # (LAST) or N; padded columns get -1 or N. One program per head, so no atomics.
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    X += b.to(tl.int64) * s_xb + h.to(tl.int64) * s_xh
    offs_d = tl.arange(0, BLOCK_D)
    none = -1 if LAST else N
    found = tl.zeros([BLOCK_D], tl.int32) + none
    for start in range(0, N, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        x = tl.load(X + rows[:, None] * s_xn + offs_d[None, :], mask=(rows[:, None] < N) & (offs_d[None, :] < D),
                    other=0.0).to(tl.float32)
        hit = tl.where((x != x) | (tl.abs(x) == float("inf")), rows[:, None], none)
        found = tl.maximum(found, tl.max(hit, 0)) if LAST else tl.minimum(found, tl.min(hit, 0))
    tl.store(OUT + bh.to(tl.int64) * BLOCK_D + offs_d, found)


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
def _bwd_tile(acc, w_j, do_j, lse_j, delta_j, offs_j, w_i, do_i, lse_i, delta_i, offs_i, qk_scale, scale,
              KEYS: tl.constexpr, QUERIES: tl.constexpr, DIAGONAL: tl.constexpr, INTERP_BF16: tl.constexpr,
              PRECISION: tl.constexpr):
    """Add token block i's contribution to dw_j: block j as keys of queries i (KEYS: dV_j + dK_j, 4 tile
    GEMMs with S) and as queries of keys i (QUERIES: dQ_j, 3 with S); both, 5 GEMMs, share S. DIAGONAL:
    the tile crosses the causal diagonal: query i sees key j only for j <= i; the masked P and dS
    entries are exactly 0, as the reference's (masked_fill's backward zeroes dS there even where dP is NaN).

    No masks for padding: rows past N were loaded as zeros with lse = delta = 0. Every exponent below is
    <= 0 (lse_i >= the diagonal score w_i.w_i * scale >= 0 for scale > 0, causal or not), so p is in
    [0, 1], and the zero rows of w_i / do_i cancel whatever a padded row or column contributes. A NaN or
    Inf in w makes its own softmax row NaN (its diagonal score is non-finite), so the lse of that row and
    every dw of the head are NaN, as the reference's P^T dO: every program meets that row, as a partner
    (non-causal: every program sweeps every row; causal: rows k >= j on the key side, and for j > k the
    query side's P[j,k] (dP[j,k] - delta_j) is NaN, or 0 * Inf).
    """
    st = dot(w_j, tl.trans(w_i), None, INTERP_BF16, PRECISION)              # raw S[j,i] = S[i,j]^T (BJ, BI)
    if KEYS:
        pt_ij = tl.exp2(st * qk_scale - lse_i[None, :])                     # P[i,j]^T (softmax rows i)
    if QUERIES:
        p_ji = tl.exp2(st * qk_scale - lse_j[:, None])                      # P[j,i]   (softmax rows j)
    if KEYS:
        dpt_ij = dot(w_j, tl.trans(do_i), None, INTERP_BF16, PRECISION)     # dP[i,j]^T = w_j dO_i^T
    if QUERIES:
        dp_ji = dot(do_j, tl.trans(w_i), None, INTERP_BF16, PRECISION)      # dP[j,i]  = dO_j w_i^T
    if KEYS:
        t = pt_ij * (dpt_ij - delta_i[None, :])                             # dS[i,j]^T: the key side
        if DIAGONAL:
            sees = offs_j[:, None] <= offs_i[None, :]
            pt_ij = tl.where(sees, pt_ij, 0.0)
            t = tl.where(sees, t, 0.0)
    if QUERIES:
        t_q = p_ji * (dp_ji - delta_j[:, None])                             # dS[j,i]: the query side
        if DIAGONAL:
            t_q = tl.where(offs_i[None, :] <= offs_j[:, None], t_q, 0.0)
        if KEYS:
            t = t + t_q              # dS[i,j]^T + dS[j,i]: the key-side and query-side score gradients
        else:
            t = t_q
    if KEYS:
        acc = dot(cast(pt_ij, w_i.dtype, INTERP_BF16), do_i, acc, INTERP_BF16, PRECISION)       # dV_j
    return dot(cast(t * scale, w_i.dtype, INTERP_BF16), w_i, acc, INTERP_BF16, PRECISION)      # + dK_j, dQ_j


@triton.jit
def _bwd_block(acc, w_j, do_j, lse_j, delta_j, offs_j, W, DO, LSE, DELTA, start, offs_d, s_wn, s_dn, N, D,
               qk_scale, scale, BLOCK_I: tl.constexpr, MASK_ROWS: tl.constexpr, KEYS: tl.constexpr,
               QUERIES: tl.constexpr, DIAGONAL: tl.constexpr, EVEN_D: tl.constexpr, INTERP_BF16: tl.constexpr,
               PRECISION: tl.constexpr):
    """Load token block i = [start, start + BLOCK_I) and add its contribution to dw_j (_bwd_tile)."""
    offs_i = start + tl.arange(0, BLOCK_I)
    w_i = _load_rows(W, offs_i, offs_d, s_wn, N, D, MASK_ROWS, EVEN_D)
    do_i = _load_rows(DO, offs_i, offs_d, s_dn, N, D, MASK_ROWS, EVEN_D)
    if MASK_ROWS:
        lse_i = tl.load(LSE + offs_i, mask=offs_i < N, other=0.0)
        delta_i = tl.load(DELTA + offs_i, mask=offs_i < N, other=0.0)
    else:
        lse_i = tl.load(LSE + offs_i)
        delta_i = tl.load(DELTA + offs_i)
    return _bwd_tile(acc, w_j, do_j, lse_j, delta_j, offs_j, w_i, do_i, lse_i, delta_i, offs_i, qk_scale, scale,
                     KEYS, QUERIES, DIAGONAL, INTERP_BF16, PRECISION)


@triton.autotune(configs=BWD_CONFIGS, key=["N", "D", "CAUSAL"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _mssa_bwd_kernel(
    W, DO, LSE, DELTA, DW, FIRST,                # w, do, dw: (B, H, N, D) strided; lse, delta: (B*H, N);
    s_wb, s_wh, s_wn, s_db, s_dh, s_dn, s_dwb, s_dwh, s_dwn,      # first: (B*H, BLOCK_D) int32 (CAUSAL)
    H, N, D, qk_scale, scale,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    CAUSAL: tl.constexpr, ONE_LOOP: tl.constexpr, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr,
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
    j0 = pid_j * BLOCK_J
    offs_j = j0 + tl.arange(0, BLOCK_J)                        # the token block this program owns
    w_j = _load_rows(W, offs_j, offs_d, s_wn, N, D, True, EVEN_D)
    do_j = _load_rows(DO, offs_j, offs_d, s_dn, N, D, True, EVEN_D)
    lse_j = tl.load(LSE + offs_j, mask=offs_j < N, other=0.0)
    delta_j = tl.load(DELTA + offs_j, mask=offs_j < N, other=0.0)

    acc = tl.zeros([BLOCK_J, BLOCK_D], tl.float32)
    if CAUSAL:       # the module docstring's sweep
        j_end = tl.minimum(j0 + BLOCK_J, N)
        if ONE_LOOP:
            # fp32: one loop body, the diagonal tile's, on every partner (its masks hold anywhere): 5 GEMMs
            # per pair as non-causal. Every multi-body fp32 variant tried spilled some config (aot_check).
            for start in range(0, N, BLOCK_I):
                acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, offs_j, W, DO, LSE, DELTA, start, offs_d, s_wn,
                                 s_dn, N, D, qk_scale, scale, BLOCK_I, True, True, True, True, EVEN_D, INTERP_BF16,
                                 PRECISION)
        else:
            # 5 GEMMs on the diagonal, 3 left of it, 4 right of it. (This loop order compiled without
            # spills where the others spilled a few bytes on sm_80.)
            for start in range(j0, j_end, BLOCK_I):              # the diagonal tiles (BLOCK_J / BLOCK_I)
                acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, offs_j, W, DO, LSE, DELTA, start, offs_d, s_wn,
                                 s_dn, N, D, qk_scale, scale, BLOCK_I, True, True, True, True, EVEN_D, INTERP_BF16,
                                 PRECISION)
            for start in range(0, j0, BLOCK_I):                  # partners i < j0: dQ_j only, whole tiles < N
                acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, offs_j, W, DO, LSE, DELTA, start, offs_d, s_wn,
                                 s_dn, N, D, qk_scale, scale, BLOCK_I, False, False, True, False, EVEN_D,
                                 INTERP_BF16, PRECISION)
            for start in range(j_end, N, BLOCK_I):               # partners i > j: dK_j + dV_j only
                acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, offs_j, W, DO, LSE, DELTA, start, offs_d, s_wn,
                                 s_dn, N, D, qk_scale, scale, BLOCK_I, True, True, False, False, EVEN_D, INTERP_BF16,
                                 PRECISION)
    elif ONE_LOOP:   # fp32 (FMA dots, register-hungry): a second copy of the body would spill
        for start in range(0, N, BLOCK_I):
            acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, offs_j, W, DO, LSE, DELTA, start, offs_d, s_wn, s_dn,
                             N, D, qk_scale, scale, BLOCK_I, True, True, True, False, EVEN_D, INTERP_BF16, PRECISION)
    else:
        n_full = N - N % BLOCK_I
        for start in range(0, n_full, BLOCK_I):  # full tiles: unmasked loads
            acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, offs_j, W, DO, LSE, DELTA, start, offs_d, s_wn, s_dn,
                             N, D, qk_scale, scale, BLOCK_I, False, True, True, False, EVEN_D, INTERP_BF16, PRECISION)
        if n_full < N:                           # the tail tile
            acc = _bwd_block(acc, w_j, do_j, lse_j, delta_j, offs_j, W, DO, LSE, DELTA, n_full, offs_d, s_wn, s_dn,
                             N, D, qk_scale, scale, BLOCK_I, True, True, True, False, EVEN_D, INTERP_BF16, PRECISION)

    mask = (offs_j[:, None] < N) & (offs_d[None, :] < D)
    dw_ptrs = DW + b.to(tl.int64) * s_dwb + h.to(tl.int64) * s_dwh + offs_j[:, None] * s_dwn + offs_d[None, :]
    tl.store(dw_ptrs, cast(acc, DW.dtype.element_ty, INTERP_BF16), mask=mask)
    if CAUSAL:
        # The reference's 0 * NaN: a non-finite dO[k, c] of a query k < j reaches dw[j, c] through
        # P[k, j] = 0 (attn^T dO); a second, predicated store, as the forward's.
        first = tl.load(FIRST + bh.to(tl.int64) * BLOCK_D + offs_d)
        tl.store(dw_ptrs, cast(tl.full([BLOCK_J, BLOCK_D], float("nan"), tl.float32), DW.dtype.element_ty, INTERP_BF16),
                 mask=mask & (first[None, :] < offs_j[:, None]))


# Argument types for aot_check.py: pointers take the data dtype (LSE and DELTA are fp32, LAST, FIRST and
# OUT int32), the named floats are scalars, and every stride is a multiple of 16 at CRATE's shapes (rows
# of H * D elements).
AOT_SPECS = {
    "_mssa_fwd_kernel": dict(ptr=["W", "O", "LSE", "LAST"], fp32_ptr=["LSE"], i32_ptr=["LAST"], floats=["qk_scale"],
                             div16=["s_wb", "s_wh", "s_wn", "s_ob", "s_oh", "s_on"]),
    "_mssa_nonfinite_rows_kernel": dict(ptr=["X", "OUT"], fp32_ptr=[], i32_ptr=["OUT"], floats=[],
                                        div16=["s_xb", "s_xh", "s_xn"]),
    "_mssa_bwd_delta_kernel": dict(ptr=["O", "DO", "DELTA"], fp32_ptr=["DELTA"], floats=[],
                                   div16=["s_ob", "s_oh", "s_on", "s_db", "s_dh", "s_dn"]),
    "_mssa_bwd_kernel": dict(ptr=["W", "DO", "LSE", "DELTA", "DW", "FIRST"], fp32_ptr=["LSE", "DELTA"],
                             i32_ptr=["FIRST"], floats=["qk_scale", "scale"],
                             div16=["s_wb", "s_wh", "s_wn", "s_db", "s_dh", "s_dn", "s_dwb", "s_dwh", "s_dwn"]),
}


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------
def _head_block(D: int) -> int:
    return next(b for b in HEAD_BLOCKS if b >= D)


def _nonfinite_rows(x: torch.Tensor, last: bool, block_d: int, traced: bool) -> torch.Tensor:
    """x: (B, H, N, D), last stride 1 -> (B*H, block_d) int32: per head and column, the last (last=True)
    or first row holding a NaN or Inf, else -1 (last) or N."""
    B, H, N, D = x.shape
    out = torch.empty(B * H, block_d, device=x.device, dtype=torch.int32)
    launch(_mssa_nonfinite_rows_kernel, traced)[(B * H,)](
        x, out, *x.stride()[:3], H, N, D, LAST=last, BLOCK_N=DELTA_BLOCK_M, BLOCK_D=block_d)
    return out


def _mssa_forward(w: torch.Tensor, scale: float, causal: bool,
                  traced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (B, H, N, D), last stride 1 -> o: (B, H, N, D) with w's strides, lse: (B*H, N) fp32 (base 2)."""
    B, H, N, D = w.shape
    block_d = _head_block(D)
    o = torch.empty_like(w)            # same strides as w: the model's (B, N, H, D) memory layout
    lse = torch.empty(B * H, N, device=w.device, dtype=torch.float32)
    last = _nonfinite_rows(w, True, block_d, traced) if causal else w     # w: a placeholder, never read
    grid = lambda META: (triton.cdiv(N, META["BLOCK_M"]), B * H)  # noqa: E731
    launch(_mssa_fwd_kernel, traced)[grid](
        w, o, lse, last, *w.stride()[:3], *o.stride()[:3], H, N, D, scale * LOG2E,
        BLOCK_D=block_d, EVEN_D=block_d == D, CAUSAL=causal,
        INTERP_BF16=interp_bf16(w.dtype), PRECISION=dot_precision(w.dtype))
    return o, lse


def _mssa_backward(w: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                   scale: float, causal: bool, traced: bool = False) -> torch.Tensor:
    """w, o, do: (B, H, N, D); lse: (B*H, N) from the forward -> dw: (B, H, N, D) with w's strides."""
    B, H, N, D = w.shape
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty_like(lse)
    block_d = _head_block(D)
    launch(_mssa_bwd_delta_kernel, traced)[(triton.cdiv(N, DELTA_BLOCK_M), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, N, D, BLOCK_M=DELTA_BLOCK_M, BLOCK_D=block_d)
    first = _nonfinite_rows(do, False, block_d, traced) if causal else w   # w: a placeholder, never read
    dw = torch.empty_like(w)
    grid = lambda META: (triton.cdiv(N, META["BLOCK_J"]), B * H)  # noqa: E731
    launch(_mssa_bwd_kernel, traced)[grid](
        w, do, lse, delta, dw, first, *w.stride()[:3], *do.stride()[:3], *dw.stride()[:3],
        H, N, D, scale * LOG2E, scale, BLOCK_D=block_d, EVEN_D=block_d == D, CAUSAL=causal,
        ONE_LOOP=w.dtype == torch.float32, INTERP_BF16=interp_bf16(w.dtype), PRECISION=dot_precision(w.dtype))
    return dw


# ------------------------------------------------------------------------------------------------
# torch.library ops + autograd (torch.compile keeps them in its graph), and the eager twin
# ------------------------------------------------------------------------------------------------
# The backward launch as an op of its own, for graphs that trace the backward.
mssa_bwd = traced_op("crate_fast::mssa_bwd", _mssa_backward,
                     fake=lambda w, o, lse, do, scale, causal: torch.empty_like(w))


def _fake_forward(w, scale, causal):
    B, H, N, _ = w.shape
    return torch.empty_like(w), w.new_empty(B * H, N, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    w, scale, causal = inputs
    o, lse = output
    ctx.save_for_backward(w, o, lse)
    ctx.scale, ctx.causal = scale, causal
    ctx.mark_non_differentiable(lse)


@once_differentiable       # first-order only, as the torch path (torch_ops.py)
def _backward(ctx, do, _dlse):
    w, o, lse = ctx.saved_tensors
    backward = mssa_bwd if tracing(do) else _mssa_backward
    return backward(w, o, lse, do, ctx.scale, ctx.causal), None, None


mssa_fwd, mssa_fwd_twin = op_with_twin("crate_fast::mssa_fwd", _mssa_forward, fake=_fake_forward,
                                     setup_context=_setup_context, backward=_backward)


# ------------------------------------------------------------------------------------------------
# Entry point, for the inputs mssa_attention admitted: CUDA (or the interpreter), fp32/fp16/bf16,
# head dim <= 128 (64 in fp32), scale > 0, non-empty
# ------------------------------------------------------------------------------------------------
def mssa_attention_triton(w: torch.Tensor, scale: float, causal: bool = False) -> torch.Tensor:
    """w: (B, H, N, D) -> (B, H, N, D) on the fused kernels; causal: query i attends to keys j <= i.
    Attention dropout is not supported."""
    if w.stride(-1) != 1:
        w = w.contiguous()
    return call(mssa_fwd, mssa_fwd_twin, w, scale, causal)[0]
