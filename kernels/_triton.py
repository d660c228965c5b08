"""Triton plumbing shared by mssa.py, ista.py and odl.py: config rows and their admission, the dot and
cast helpers, precision, op registration.

Imported only when a Triton path is used, so CPU-only installs never need triton.
"""
from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton

from ._utils import interpreting

INTERPRET = interpreting()
# CRATE_FAST_AUTOTUNE=0 skips autotuning and takes the first admitted config (fast test runs).
AUTOTUNE = os.environ.get("CRATE_FAST_AUTOTUNE", "1") != "0"
_forced_config: int | None = None


# ------------------------------------------------------------------------------------------------
# Autotune candidates. Each kernel lists rows; a row is admitted for a launch when it fits the dtype,
# the arch and (MSSA) the head block. ``python -m crate_fast.kernels.aot_check`` compiles every admitted
# combination for sm_80 and sm_90a and fails on any register spill or shared-memory overflow.
# ------------------------------------------------------------------------------------------------
class ConfigRow(NamedTuple):
    dtypes: str        # "16bit" (fp16 and bf16), "fp32", or "any" (the interpreter's single row)
    blocks: dict       # the kernel's block-size constexprs, e.g. {"BLOCK_M": 64, "BLOCK_N": 32}
    warps: int
    stages: int
    sm80: int          # the largest head block it compiles for without spills on sm_80 (0: none) ...
    sm90: int          # ... and on sm_90a, with Triton 3.6 and 3.8 alike


# Kernels without a head dim (ISTA, ODL) admit a row at the nominal head block 1: sm80/sm90 say whether it fits.
FITS, SPILLS = 1, 0


def configs(rows: list[ConfigRow], interpreter_row: ConfigRow, **constexprs) -> list[triton.Config]:
    """The autotuner's candidates: one per row (the interpreter runs its single small row), each
    carrying its row for admitted(); constexprs are common to all (e.g. GROUP_M)."""
    out = []
    for row in [interpreter_row] if INTERPRET else rows:
        cfg = triton.Config({**row.blocks, **constexprs}, num_warps=row.warps, num_stages=row.stages)
        cfg.row = row
        out.append(cfg)
    return out


def admitted(configs: list[triton.Config], dtype: str, arch: int, head_block: int = FITS) -> list[triton.Config]:
    """The candidates that fit this dtype ("fp16", "bf16", "fp32"), arch (80, 90) and head block."""
    cls = "fp32" if dtype == "fp32" else "16bit"
    return [c for c in configs
            if c.row.dtypes in (cls, "any") and head_block <= (c.row.sm90 if arch >= 90 else c.row.sm80)]


def select_configs(admitted: list) -> list:
    """What the autotuner may try: every admitted config, the first only, or one forced by tests."""
    if _forced_config is not None:
        return [admitted[_forced_config % len(admitted)]]
    return admitted if AUTOTUNE else admitted[:1]


@contextlib.contextmanager
def force_config(index: int, *kernels):
    """Run the given autotuned kernels with their index-th admitted config (tests of every config)."""
    global _forced_config
    _forced_config = index
    for k in kernels:
        k.cache.clear()
    try:
        yield
    finally:
        _forced_config = None
        for k in kernels:
            k.cache.clear()


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def arch_of(t: torch.Tensor) -> int:
    """Which resource table applies: 90 for Hopper and newer, 80 for everything older."""
    if not t.is_cuda:
        return 90
    return 90 if torch.cuda.get_device_capability(t.device)[0] >= 9 else 80


# ------------------------------------------------------------------------------------------------
# Device helpers
# ------------------------------------------------------------------------------------------------
# Two gaps of the CPU interpreter (Triton 3.6-3.8) with bfloat16, routed around when INTERP_BF16 is
# set (interpreting bf16 data only; on a GPU both helpers are plain tl.dot / .to):
#  - tl.dot on bf16 operands multiplies raw bit patterns (triton#11584): feed it fp32 copies;
#  - fp32 -> bf16 casts truncate instead of rounding to nearest even, doubling the rounding error
#    and biasing it: round first with integer arithmetic, so the cast itself is exact.
@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n), the output tile of this GEMM program in grouped order: GROUP_M row blocks in a row
    share each B column panel while it is in L2 (the ISTA and ODL kernels)."""
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % group) % size_m, (pid % group) // size_m


@triton.jit
def dot(a, b, acc, INTERP_BF16: tl.constexpr, PRECISION: tl.constexpr):
    """tl.dot(a, b, acc) with fp32 accumulation."""
    if INTERP_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does."""
    if INTERP_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            # A NaN's payload could carry into the sign bit or wrap to zero: keep NaNs as they are.
            x = tl.where(x != x, x.to(tl.float32), rounded.to(tl.float32, bitcast=True))
    return x.to(dtype)


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 operands: IEEE fp32 unless the user allowed TF32 for matmuls (torch's own switch)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not INTERPRET else "ieee"


def interp_bf16(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# Launching, eager and traced
# ------------------------------------------------------------------------------------------------
def launch(kernel, traced: bool):
    """The kernel as launched inside a torch.library op (wrap_triton: torch.compile sees it) or from
    eager code (the raw kernel; the interpreter always runs it directly)."""
    return wrap_triton(kernel) if traced and not INTERPRET else kernel


def register_op(name: str):
    """torch.library registration: triton_op on GPUs (torch.compile traces into the kernels), an opaque
    custom_op under the interpreter (tracing cannot run interpreted kernels on fake tensors).

    Eager calls bypass these ops through a plain autograd.Function: on the H100 machine an eager
    triton_op call of the attention backward (two launches) took 0.36 ms of host time, as it goes
    through the wrap_triton higher-order op; its kernels take 0.38 ms of GPU time at CRATE-B size."""
    if INTERPRET:
        return custom_op(name, mutates_args=())
    return triton_op(name, mutates_args=())


def tracing(t: torch.Tensor) -> bool:
    """Is t a tracing stand-in (torch.compile, export, opcheck) rather than real memory? A backward
    shared by an op and its eager twin then launches through the registered ops, which the traced
    graph records. (is_compiling() alone misses AOTAutograd tracing a backward in older torch releases
    and in opcheck.)"""
    return torch.compiler.is_compiling() or is_fake(t)
