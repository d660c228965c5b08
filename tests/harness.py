"""Shared test helpers: the gradient runner and the comparisons against a float64 truth.

Every kernel and model test compares (output, every gradient) of the path under test with a float64
truth: fp32 within FP32_RTOL, 16-bit under the 2x rule against plain PyTorch in the same dtype
(docs/DESIGN.md §5). The literals live in tolerances.py.
"""
from __future__ import annotations

import torch
from tolerances import FP32_RTOL, LOWP_ATOL, LOWP_FACTOR


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    assert x.shape == truth.shape, (x.shape, truth.shape)
    assert torch.isfinite(x).all(), "non-finite values (unwritten or poisoned output?)"
    return (x.double().cpu() - truth.double().cpu()).abs().max().item()


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return max_err(x, truth) / max(truth.double().abs().max().item(), 1e-30)


def assert_rel(x: torch.Tensor, truth: torch.Tensor, rtol: float = FP32_RTOL, what: str = "") -> None:
    err = rel_err(x, truth)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def assert_2x_rule(x: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, what: str = "",
                   atol: float | None = None) -> None:
    """err(x) <= 2 * err(plain PyTorch, same dtype) + atol, both against the float64 truth."""
    atol = LOWP_ATOL.get(x.dtype, 1e-6) if atol is None else atol
    scale = max(truth.double().abs().max().item(), 1.0)
    e_x, e_plain = max_err(x, truth), max_err(plain, truth)
    bound = LOWP_FACTOR * e_plain + atol * scale
    assert e_x <= bound, f"{what}: error {e_x:.3e} > 2 x plain {e_plain:.3e} + atol ({bound:.3e})"


def check(got: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, what: str = "",
          atol: float | None = None) -> None:
    """The suite's rule for one tensor: fp32 within FP32_RTOL of the truth, 16-bit the 2x rule."""
    if got.dtype == torch.float32:
        assert_rel(got, truth, what=what)
    else:
        assert_2x_rule(got, plain, truth, what=what, atol=atol)


def run_grads(fn, *inputs: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    """[fn(*inputs), d/d input for each input] for the upstream gradient `grad`; inputs are cloned
    (keeping their strides) so the caller's tensors are untouched."""
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in inputs]


def check_all(names, got, plain, truth, atol: float | None = None) -> None:
    """check() for each (name, got, plain, truth) of an output-and-gradients list."""
    for name, g, p, t in zip(names, got, plain, truth, strict=True):
        check(g, p, t, what=name, atol=atol)
