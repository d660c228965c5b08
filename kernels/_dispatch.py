"""Dispatch policy shared by the three operators: impl names, where the Triton kernels can run, autocast.

Nothing here imports triton: CPU-only installs never need it.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

IMPLS = ("auto", "reference", "torch", "triton")
# What the Triton kernels read and write (fp32 accumulation inside).
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# MSSA head dims the kernels take; aot_check.py verifies that some config fits every head block up to
# these. The fp32 backward spills at head block 128 with every tile shape.
MAX_HEAD_DIM = 128
FP32_MAX_HEAD_DIM = 64

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def check_impl(impl: str) -> str:
    """impl itself if it names an implementation, else ValueError (the one check of impl names)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


def interpreting() -> bool:
    """True when Triton kernels run on the CPU under TRITON_INTERPRET=1 (tests on machines with no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_refusal(op: str, device_type: str, dtypes: tuple, head_dim: int | None = None) -> Exception | None:
    """Why the Triton kernels of `op` cannot take an input (the exception to raise), or None if they can.

    dtypes: every dtype the kernels would read or write; head_dim: MSSA's (None for ISTA and ODL)."""
    if not _HAS_TRITON or not (device_type == "cuda" or (device_type == "cpu" and interpreting())):
        why = "triton is not installed" if not _HAS_TRITON else f"the tensor is on {device_type}"
        return RuntimeError(f"{op}(impl='triton') needs a CUDA tensor and triton ({why}); use impl='torch' or "
                            "'auto' on this device (tests may set TRITON_INTERPRET=1 to run it on the CPU)")
    for dtype in dtypes:
        if dtype not in TRITON_DTYPES:
            return TypeError(f"{op}(impl='triton'): the Triton kernels take float32, float16 or bfloat16, "
                             f"got {dtype}")
    why = None
    if head_dim is not None and head_dim > MAX_HEAD_DIM:
        why = f"head dim {head_dim} > {MAX_HEAD_DIM}"
    elif head_dim is not None and torch.float32 in dtypes and head_dim > FP32_MAX_HEAD_DIM:
        why = (f"fp32 with head dim {head_dim} > {FP32_MAX_HEAD_DIM} (the fused backward would spill registers; "
               "run under bf16/fp16 autocast)")
    return NotImplementedError(f"{op}(impl='triton'): {why}; use impl='torch' for this input") if why else None


def _choose(op: str, device_type: str, dtypes: tuple, head_dim: int | None) -> str:
    if device_type != "cuda":
        return "torch"
    return "torch" if triton_refusal(op, device_type, dtypes, head_dim) else "triton"


_choose_once = functools.lru_cache(maxsize=None)(_choose)


def auto_impl(op: str, device_type: str, dtypes: tuple, head_dim: int | None = None) -> str:
    """What impl="auto" runs: "triton" for CUDA inputs the kernels take, "torch" for everything else.

    Decided once per (op, device type, dtypes, head dim) in eager mode. torch.compile decides once per
    graph, while tracing (guarded by the dtypes and shapes it read), so it bypasses the cache, which
    dynamo would trace through with a warning."""
    if torch.compiler.is_compiling():
        return _choose(op, device_type, dtypes, head_dim)
    return _choose_once(op, device_type, dtypes, head_dim)


def resolve_impl(op: str, impl: str, device_type: str, dtypes: tuple, head_dim: int | None = None) -> str:
    """What a fast impl ("torch", "triton" or "auto") of `op` runs on this input: "torch" or "triton".
    Explicit "triton" raises what triton_refusal gives; "auto" is auto_impl's choice."""
    if impl == "triton":
        why = triton_refusal(op, device_type, dtypes, head_dim)
        if why:
            raise why
    elif impl == "auto":
        return auto_impl(op, device_type, dtypes, head_dim)
    return impl


def autocast_dtype(t: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype active for this tensor's device, or None."""
    dev = t.device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def autocast_cast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Apply the surrounding autocast to a custom op's inputs, as autocast does for F.linear.

    Custom autograd Functions and torch.library ops are not cast by autocast themselves; casting here,
    outside them, lets autograd cast the gradients back to the parameters' dtype.
    """
    dtype = autocast_dtype(tensors[0])
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
