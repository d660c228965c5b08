"""Small shared helpers for the kernel paths: dispatch checks, autocast, Triton availability."""
from __future__ import annotations

import importlib.util
import os

import torch

IMPLS = ("auto", "reference", "torch", "triton")


def interpreting() -> bool:
    """True when Triton kernels run on the CPU under TRITON_INTERPRET=1 (tests on machines with no GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_HAS_TRITON = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _HAS_TRITON


def triton_supports(t: torch.Tensor) -> bool:
    """Can the Triton path run on this tensor? CUDA tensors, or CPU tensors under the interpreter."""
    if not triton_importable():
        return False
    return t.is_cuda or (t.device.type == "cpu" and interpreting())


def resolve_impl(impl: str, t: torch.Tensor) -> str:
    """Map "auto" to "torch" where Triton cannot run; reject names and devices that cannot work.

    "auto" stays "auto" for CUDA tensors: the operator then checks its own input limits."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "auto" if t.is_cuda and triton_importable() else "torch"
    if impl == "triton" and not triton_supports(t):
        why = "triton is not installed" if not triton_importable() else f"the tensor is on {t.device}"
        raise RuntimeError(f"impl='triton' needs a CUDA tensor and triton ({why}); use impl='torch' or "
                           "'auto' on this device (tests may set TRITON_INTERPRET=1 to run it on the CPU)")
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
