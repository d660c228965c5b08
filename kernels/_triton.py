"""Triton plumbing shared by mssa.py and ista.py: the dot helper, precision, op registration.

Imported only when a Triton path is used, so CPU-only installs never need triton.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch.library import custom_op, triton_op, wrap_triton

from ._utils import interpreting

INTERPRET = interpreting()
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# CRATE_FAST_AUTOTUNE=0 skips autotuning and takes the first admitted config (fast test runs).
AUTOTUNE = os.environ.get("CRATE_FAST_AUTOTUNE", "1") != "0"
_forced_config: int | None = None


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


# Two gaps of the CPU interpreter (Triton 3.6-3.8) with bfloat16, routed around when INTERP_BF16 is
# set (interpreting bf16 data only; on a GPU both helpers are plain tl.dot / .to):
#  - tl.dot on bf16 operands multiplies raw bit patterns (triton#11584): feed it fp32 copies;
#  - fp32 -> bf16 casts truncate instead of rounding to nearest even, doubling the rounding error
#    and biasing it: round first with integer arithmetic, so the cast itself is exact.
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
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 operands: IEEE fp32 unless the user allowed TF32 for matmuls (torch's own switch)."""
    if dtype != torch.float32:
        return None
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 and not INTERPRET else "ieee"


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def arch_of(t: torch.Tensor) -> int:
    """Which resource table applies: 90 for Hopper and newer, 80 for everything older."""
    if not t.is_cuda:
        return 90
    return 90 if torch.cuda.get_device_capability(t.device)[0] >= 9 else 80


def interp_bf16(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


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


def check_tensor(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: the Triton kernels take float32, float16 or bfloat16, got {t.dtype}")
    if not (t.is_cuda or (INTERPRET and t.device.type == "cpu")):
        raise RuntimeError(f"{name}: the Triton kernels need a CUDA tensor, got one on {t.device}")
