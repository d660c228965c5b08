"""CRATE's operators, each with three implementations behind one dispatching function.

This folder (kernels/) is installed as the package ``crate_fast.kernels`` (setup.py's package_dir): import
it by that name, never as ``kernels``.

- ``mssa_attention(w, scale=None, causal=False, impl="auto", recompute=False)``: tied q = k = v softmax
  attention, (B, H, N, D); causal: query i attends to keys j <= i (CRATE-GPT).
- ``ista_step(x, weight, step_size=0.1, lambd=0.1, impl="auto")``: one non-negative ISTA step, (..., C).
- ``odl_step(x, D, D1, step_size=0.1, lambd=0.1, residual=None, recompute=False, impl="auto")``:
  CRATE-alpha's two-step overcomplete sparse coding with a decoupled synthesis dictionary, (..., d).

impl (``IMPLS``; ``check_impl`` validates a name): "reference" (literal official math, autograd),
"torch" (fast PyTorch with hand-written backward, any device), "triton" (fused kernels; CUDA, or CPU
under TRITON_INTERPRET=1), "auto" (triton for CUDA inputs the kernels take, torch otherwise; decided
once per op, device type, dtypes and head dim). Under torch.autocast the matrix work runs in the
autocast dtype, as F.linear's would; ISTA's residual and output keep the input's dtype, ODL's output
takes its residual's dtype (the compute dtype without one). NaN and Inf propagate as in the reference
(torch_ops.py notes where the exact reformulations place some Infs otherwise).

Each function checks its inputs once; the implementations behind it take them as checked.
"""
from __future__ import annotations

import math

import torch

from ._dispatch import IMPLS, autocast_cast, autocast_dtype, check_impl, resolve_impl
from .reference import ista_step_ref, mssa_attention_ref, odl_step_ref
from .torch_ops import ista_step_torch, mssa_attention_torch, odl_step_torch

__all__ = ["IMPLS", "check_impl", "mssa_attention", "ista_step", "odl_step", "mssa_attention_ref", "ista_step_ref",
           "odl_step_ref"]


def mssa_attention(w: torch.Tensor, scale: float | None = None, causal: bool = False,
                   impl: str = "auto", recompute: bool = False) -> torch.Tensor:
    """softmax(scale * w w^T) w per head. w: (B, H, N, D) -> (B, H, N, D); scale defaults to D^-1/2.

    causal: query i attends to keys j <= i (the scores above the diagonal are -inf before the softmax),
    as mssa_attention_ref(causal=True), NaN and Inf included (a non-finite w[k, c] makes out[i < k, c] NaN
    there too: its 0 * NaN). recompute (impl="torch"): save each row's log-sum-exp for the backward
    instead of the (B, H, N, N) probabilities, which it recomputes (one more batched GEMM); the Triton
    kernels never save the probabilities, the reference saves what its autograd saves. Raises ValueError
    for a w that is not 4-D, TypeError for a non-float one."""
    check_impl(impl)
    causal = bool(causal)
    if w.dim() != 4:
        raise ValueError(f"w must be (B, H, N, D), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    D = w.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    if impl == "reference":
        return mssa_attention_ref(w, scale, causal=causal)
    (w,) = autocast_cast(w)
    # The kernels rely on scale > 0 (the diagonal score then bounds every exponent); CRATE's is D^-1/2.
    # (comparisons, not math.isfinite: under torch.compile a scale that varied between calls is symbolic)
    kernel_scale = 0 < scale < math.inf
    if impl == "auto" and not kernel_scale:
        impl = "torch"
    impl = resolve_impl("mssa_attention", impl, w.device.type, (w.dtype,), D)
    if impl == "triton" and not kernel_scale:
        raise ValueError(f"mssa_attention(impl='triton') needs a finite scale > 0, got {scale}")
    if impl == "torch" or w.numel() == 0:          # an empty input launches no kernel
        return mssa_attention_torch(w, scale, causal, bool(recompute))
    from .mssa import mssa_attention_triton

    return mssa_attention_triton(w, scale, causal)


def ista_step(x: torch.Tensor, weight: torch.Tensor, step_size: float = 0.1, lambd: float = 0.1,
              impl: str = "auto") -> torch.Tensor:
    """relu(x + eta (x W - x W^T W) - eta lambda). x: (..., C), weight: (C, C) -> (..., C).

    The output has x's dtype. Under torch.autocast the GEMM operands run in the autocast dtype while
    the residual x and the output keep x's dtype (fp32), as autocast runs the official code.
    impl="torch" takes the operator form x (W - W^T W) for M >= C token rows and the two-GEMM form
    (x - x W^T) W for fewer (torch_ops.ista_uses_operator_form); the Triton kernel is the operator form."""
    check_impl(impl)
    c = x.shape[-1]
    if weight.shape != (c, c):
        raise ValueError(f"weight must be ({c}, {c}) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}")
    if not (x.is_floating_point() and weight.is_floating_point()):
        raise TypeError(f"x and weight must be floating point, got {x.dtype} and {weight.dtype}")
    if impl == "reference":
        return ista_step_ref(x, weight, step_size, lambd)
    compute_dtype = autocast_dtype(x) or x.dtype
    # The kernel reads x_c in the compute dtype and the residual x, and writes in x's dtype; the weight
    # only enters through torch ops (the C x C operator), in any dtype.
    impl = resolve_impl("ista_step", impl, x.device.type, (compute_dtype, x.dtype))
    if impl == "torch" or x.numel() == 0:          # an empty input launches no kernel
        return ista_step_torch(x, weight, float(step_size), float(lambd), compute_dtype)
    from .ista import ista_step_triton

    return ista_step_triton(x, weight, float(step_size), float(lambd), compute_dtype)


def odl_step(x: torch.Tensor, D: torch.Tensor, D1: torch.Tensor, step_size: float = 0.1, lambd: float = 0.1,
             residual: torch.Tensor | None = None, recompute: bool = False, impl: str = "auto") -> torch.Tensor:
    """CRATE-alpha's ODL block: residual + relu(a1 - eta (a1 D^T - x) D - eta lambda) D1^T with
    a1 = relu(eta x D - eta lambda) (the official port's OvercompleteISTABlock, odl_step_ref).

    x: (..., d); D, D1: (d, m) -> (..., d). residual (x's shape) is added to the output when given (the
    block's skip connection, z_half in the model). The GEMMs run in x's dtype, or in the autocast dtype
    under torch.autocast; the output has the residual's dtype promoted with that compute dtype (fp32 for
    an fp32 residual stream under bf16 autocast, as autocast runs the port's ``ff(x) + x``), or the
    compute dtype without residual, as the port's last matmul. Gradients return in the inputs' dtypes.
    recompute (impl="torch" and "triton"): False saves what the backward needs, the bytes of the
    reference's autograd (the faster step); True saves a fifth of them (x and the first code's residual)
    and recomputes both codes in the backward (2 more GEMMs of 12; torch_ops.py measures both).
    impl="reference" ignores it.
    Raises ValueError for mismatched shapes or devices, TypeError for non-float inputs."""
    check_impl(impl)
    d = x.shape[-1]
    if D.dim() != 2 or D.shape[0] != d or D1.shape != D.shape:
        raise ValueError(f"D and D1 must both be ({d}, m) for x of shape {tuple(x.shape)}, got "
                         f"{tuple(D.shape)} and {tuple(D1.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    tensors = (x, D, D1) if residual is None else (x, D, D1, residual)
    if not all(t.is_floating_point() for t in tensors):
        raise TypeError(f"x, D, D1 and residual must be floating point, got {[t.dtype for t in tensors]}")
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"x, D, D1 and residual must be on one device, got {[str(t.device) for t in tensors]}")
    if impl == "reference":
        out = odl_step_ref(x, D, D1, step_size, lambd)
        return out if residual is None else residual + out
    compute_dtype = autocast_dtype(x) or x.dtype
    # The kernels read x_c, D_c, D1_c and write the codes in the compute dtype; the last one reads the
    # residual and writes the output in their promoted dtype.
    dtypes = (compute_dtype,) if residual is None else (compute_dtype, residual.dtype)
    impl = resolve_impl("odl_step", impl, x.device.type, dtypes)
    if impl == "torch" or x.numel() == 0:          # an empty input launches no kernel
        return odl_step_torch(x, D, D1, float(step_size), float(lambd), residual, compute_dtype, bool(recompute))
    from .odl import odl_step_triton

    return odl_step_triton(x, D, D1, float(step_size), float(lambd), residual, compute_dtype, bool(recompute))
