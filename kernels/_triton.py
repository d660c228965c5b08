"""Triton plumbing shared by mssa.py, gemm.py, ista.py and odl.py: config rows and their admission, the
dot and cast helpers, precision, op registration with an eager twin.

Imported only when a Triton path is used, so CPU-only installs never need triton.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton

from ._dispatch import interpreting
from .torch_ops import autograd_function

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
    dtypes: str                 # "16bit" (fp16 and bf16), "fp32", or "any" (the interpreter's single row)
    blocks: dict                # the kernel's block-size constexprs, e.g. {"BLOCK_M": 64, "BLOCK_N": 32}
    warps: int
    stages: int
    max_head_block_sm80: int    # the largest head block it compiles for without spills on sm_80 (0: none)
    max_head_block_sm90: int    # ... and on sm_90a, with Triton 3.6 and 3.8 alike
    causal_limits: tuple[int, int] | None = None    # (sm_80, sm_90a) limits of a kernel's causal variant
                                                    # where they are lower (mssa.py), else None


# A kernel without a head dim (the GEMM) asks admitted() for this nominal head block.
NO_HEAD_DIM = 1


def fits(sm80: bool, sm90: bool) -> dict:
    """The head-block fields of a row of a kernel without a head dim: whether it compiles without spills
    on sm_80 and on sm_90a."""
    return dict(max_head_block_sm80=NO_HEAD_DIM if sm80 else 0, max_head_block_sm90=NO_HEAD_DIM if sm90 else 0)


def configs(rows: list[ConfigRow], interpreter_row: ConfigRow, **constexprs) -> list[triton.Config]:
    """The autotuner's candidates: one per row (the interpreter runs its single small row), each
    carrying its row for admitted(); constexprs are common to all (e.g. GROUP_M)."""
    out = []
    for row in [interpreter_row] if INTERPRET else rows:
        cfg = triton.Config({**row.blocks, **constexprs}, num_warps=row.warps, num_stages=row.stages)
        cfg.row = row
        out.append(cfg)
    return out


def admitted(configs: list[triton.Config], dtype: str, arch: int, head_block: int = NO_HEAD_DIM,
             causal: bool = False) -> list[triton.Config]:
    """The candidates that fit this dtype ("fp16", "bf16", "fp32"), arch (80, 90) and head block (of the
    causal variant when causal)."""
    cls = "fp32" if dtype == "fp32" else "16bit"

    def limit(row: ConfigRow) -> int:
        limits = (row.max_head_block_sm80, row.max_head_block_sm90)
        if causal and row.causal_limits is not None:
            limits = tuple(map(min, limits, row.causal_limits))
        return limits[arch >= 90]

    return [c for c in configs if c.row.dtypes in (cls, "any") and head_block <= limit(c.row)]


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
    share each RHS column panel while it is in L2 (gemm.py)."""
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
# Launching, eager and traced: each op is a registered torch.library op (what torch.compile traces
# into) plus an eager autograd.Function twin with the same forward, setup and backward.
# ------------------------------------------------------------------------------------------------
def launch(kernel, traced: bool):
    """The kernel as launched inside a torch.library op (wrap_triton: torch.compile sees it) or from
    eager code (the raw kernel; the interpreter always runs it directly)."""
    return wrap_triton(kernel) if traced and not INTERPRET else kernel


def traced_op(name: str, forward, fake):
    """`forward`, a launcher taking `traced=`, registered as the op `name` that launches with
    traced=True, with the fake (meta) function `fake`; its schema is forward's signature without
    `traced`. triton_op on GPUs (torch.compile traces into the kernels); an opaque custom_op under the
    interpreter (tracing cannot run interpreted kernels on fake tensors)."""
    signature = inspect.signature(forward, eval_str=True)

    def body(*args):
        return forward(*args, traced=True)

    body.__name__ = body.__qualname__ = forward.__name__.lstrip("_")
    body.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "traced"])
    op = (custom_op if INTERPRET else triton_op)(name, mutates_args=())(body)
    op.register_fake(fake)
    return op


def op_with_twin(name: str, forward, fake, setup_context, backward):
    """(op, twin) for one forward launcher and its autograd: the registered op (traced_op, with
    register_autograd) and its eager twin, an autograd.Function running the same launcher, setup and
    backward (torch_ops.autograd_function). call() picks between them.

    Why a twin: on the H100 machine an eager triton_op call of the attention backward (two launches)
    took 0.36 ms of host time, as it goes through the wrap_triton higher-order op; its kernels take
    0.38 ms of GPU time at CRATE-B size. Eager calls skip the op dispatch through the twin."""
    op = traced_op(name, forward, fake)
    op.register_autograd(backward, setup_context=setup_context)
    twin_name = "".join(part.capitalize() for part in name.split("::")[-1].split("_")) + "Twin"   # MssaFwdTwin
    return op, autograd_function(twin_name, forward, setup_context, backward)


def call(op, twin, *args):
    """The registered op while torch.compile traces (its graph keeps the kernels), else the eager twin."""
    return op(*args) if torch.compiler.is_compiling() else twin.apply(*args)


def tracing(t: torch.Tensor) -> bool:
    """Is t a tracing stand-in (torch.compile, export, opcheck) rather than real memory? A backward
    shared by an op and its eager twin then launches through the registered ops, which the traced
    graph records. (is_compiling() alone misses AOTAutograd tracing a backward in older torch releases
    and in opcheck.)"""
    return torch.compiler.is_compiling() or is_fake(t)
