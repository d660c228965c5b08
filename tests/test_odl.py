"""ODL step (CRATE-alpha) against the float64 reference (the official port's autograd), for every fast
implementation: outputs and the gradients of x, D, D1 and the residual.

Triton shapes stay small for the interpreter (d in {32, 48, 64}, rows {1, 17, 65}); the torch path also
runs at the presets' widths (d in {192, 768, 1024}); tests/test_gpu_shapes.py runs the kernels at full
size on a GPU.
"""
import math

import pytest
import torch
from conftest import KERNEL_DEVICE
from harness import assert_2x_rule, assert_rel, check_all, run_grads
from inputs import (
    ODL_NAMES,
    assert_same_nonfinite,
    device_for,
    numpy_nan_warnings,
    odl_compare,
    odl_inputs,
    odl_reference,
    poisoned,
)
from tolerances import AUTOCAST_ATOL, FP64_RTOL

from crate_fast.kernels import odl_step, odl_step_ref

IMPLS = ["torch", "triton"]
# (leading shape, d): rows 1, 17 and 65; d = 48 puts a partial tile in every kernel's K or N.
SHAPES = [((1,), 32), ((17,), 48), ((5, 13), 64)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead,d", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odl_matches_reference(impl, lead, d, residual, dtype):
    *inputs, dout = odl_inputs(lead, d, dtype, device_for(impl), residual)
    names, got, plain, truth = odl_compare(impl, inputs, dout)
    assert all(g.dtype == dtype for g in got)
    check_all(names, got, plain, truth)


# The torch path at the presets' widths (CRATE-alpha S/B/L: d = 384/768/1024; 192 as in tiny models),
# token rows N = 1, 17, 197, 257 at d = 192, fewer at the wide ones to keep the suite fast.
@pytest.mark.parametrize("lead,d", [((1,), 192), ((17,), 192), ((197,), 192), ((257,), 192), ((1,), 768),
                                    ((2, 197), 768), ((17,), 1024)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odl_torch_at_preset_widths(lead, d, dtype):
    *inputs, dout = odl_inputs(lead, d, dtype, "cpu")
    names, got, plain, truth = odl_compare("torch", inputs, dout)
    check_all(names, got, plain, truth)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead,d", [((17,), 48), ((5, 13), 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_odl_autocast(impl, lead, d, residual):
    """Under bf16 autocast the GEMMs run in bf16; with an fp32 residual the output is fp32 (the port's
    ff(x) + x adds a bf16 matmul to the fp32 stream), without one bf16 (the port's last matmul).
    Gradients return in fp32, the inputs' dtype."""
    *inputs, dout = odl_inputs(lead, d, torch.float32, device_for(impl), residual)
    names, got, plain, truth = odl_compare(impl, inputs, dout, autocast=True)
    out_dtype = torch.float32 if residual else torch.bfloat16
    assert got[0].dtype == plain[0].dtype == out_dtype
    assert all(g.dtype == torch.float32 for g in got[1:])
    for name, g, p, t in zip(names, got, plain, truth, strict=True):
        assert_2x_rule(g, p, t, what=name, atol=AUTOCAST_ATOL)


@pytest.mark.parametrize("lead,d", [((17,), 48), ((2, 33), 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_odl_torch_float64_is_exact(lead, d, residual):
    *inputs, dout = odl_inputs(lead, d, torch.float64, "cpu", residual)
    names, got, _, truth = odl_compare("torch", inputs, dout)
    for name, g, t in zip(names, got, truth, strict=True):
        assert_rel(g, t, FP64_RTOL, name)


def saved_activation_bytes(fn, weight_shapes) -> int:
    """Bytes of the distinct storages autograd saves for backward while fn() runs, except weights: the
    dictionaries and their 16-bit copies under autocast (tensors of a shape in weight_shapes)."""
    seen, alive = {}, []

    def pack(t):
        if tuple(t.shape) not in weight_shapes:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        alive.append(t)            # no storage is freed (and its address reused) while counting
        return None

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("impl,lead,d", [("torch", (2, 197), 192), ("triton", (17,), 48)])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_odl_saved_activation_bytes(impl, lead, d, autocast):
    """recompute=True: x_c and e = a1 D^T - x (2 d M elements), a fifth of the port's x, a1, e and a2
    (2 (d + m) M = 10 d M); recompute=False (the default): x_c, a1, e and a2, the port's bytes."""
    dev = device_for(impl)
    x = torch.randn(*lead, d, device=dev, requires_grad=True)
    D, D1 = (torch.randn(d, 4 * d, device=dev, requires_grad=True) for _ in range(2))
    z = torch.randn(*lead, d, device=dev, requires_grad=True)
    weights = {(d, 4 * d), (4 * d, d)}
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
        ref = saved_activation_bytes(lambda: odl_reference(x, D, D1, z), weights)
        lean = saved_activation_bytes(lambda: odl_step(x, D, D1, residual=z, recompute=True, impl=impl), weights)
        default = saved_activation_bytes(lambda: odl_step(x, D, D1, residual=z, impl=impl), weights)
    assert ref == 10 * math.prod(lead) * d * (2 if autocast else 4)
    assert lean == 0.2 * ref and default == ref


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead,d", [((17,), 48), ((5, 13), 64)], ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odl_recompute_matches_reference(impl, lead, d, dtype):
    """recompute=True (a1 and a2 recomputed in the backward): the output and every gradient, as the
    default's (test_odl_matches_reference); in fp32 within rounding of the default's."""
    *inputs, dout = odl_inputs(lead, d, dtype, device_for(impl))
    names, got, plain, truth = odl_compare(impl, inputs, dout, recompute=True)
    check_all(names, got, plain, truth)
    _, saved, _, _ = odl_compare(impl, inputs, dout)
    for name, g, s in zip(names, got, saved, strict=True):
        assert_rel(g, s, 1e-5 if dtype == torch.float32 else 1e-2, name)


@numpy_nan_warnings
# The backward is one function for both impls; recompute=True runs it on recomputed a1 and a2.
@pytest.mark.parametrize("impl,recompute", [("torch", False), ("torch", True), ("triton", False), ("triton", True)])
@pytest.mark.parametrize("where,index", [("x", (3,)), ("D", (5,)), ("dout", (3,))])
@pytest.mark.parametrize("poison", ["nan", "nan_row", "+inf", "-inf", "+inf_row", "-inf_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_odl_nonfinite_like_reference(impl, recompute, where, index, poison, dtype):
    """A NaN or Inf in x (one token: one element or the row), in D (one element, or a row: one input
    coordinate of every atom) or in the upstream gradient: NaN and +-Inf at exactly the reference's
    positions in the output and every gradient."""
    x, D, D1, r, dout = odl_inputs((17,), 48, dtype, "cpu")
    if where == "x":
        x = poisoned(x, index, poison)
    elif where == "D":
        D = poisoned(D, index, poison)
    else:
        dout = poisoned(dout, index, poison)
    dev = device_for(impl)
    got = run_grads(lambda *t: odl_step(*t[:3], residual=t[3], recompute=recompute, impl=impl),
                    *(t.to(dev) for t in (x, D, D1, r)), grad=dout.to(dev))
    ref = run_grads(odl_reference, x, D, D1, r, grad=dout)
    assert not all(t.isfinite().all() for t in ref)
    assert_same_nonfinite(ODL_NAMES, got, ref)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_odl_triton_writes_every_element(poisoned_allocations, residual):
    """Every buffer the kernels write starts as NaN: outputs and gradients are finite and right."""
    *inputs, dout = odl_inputs((2, 19), 48, torch.float32, KERNEL_DEVICE, residual)
    names, got, plain, truth = odl_compare("triton", inputs, dout)
    check_all(names, got, plain, truth)


def test_odl_empty_input_launches_no_kernel(monkeypatch):
    from crate_fast.kernels import odl

    def refuse(*args):
        raise AssertionError("a kernel launch for an empty input")

    monkeypatch.setattr(odl, "odl_step_triton", refuse)
    x = torch.randn(2, 0, 32, device=KERNEL_DEVICE, requires_grad=True)
    D, D1 = (torch.randn(32, 128, device=KERNEL_DEVICE, requires_grad=True) for _ in range(2))
    out = odl_step(x, D, D1, residual=torch.randn(2, 0, 32, device=KERNEL_DEVICE), impl="triton")
    assert out.shape == (2, 0, 32)
    out.sum().backward()
    assert (D.grad == 0).all() and (D1.grad == 0).all()


def test_odl_input_errors(monkeypatch):
    x, D = torch.randn(4, 8), torch.randn(8, 32)
    with pytest.raises(ValueError, match="D and D1 must both be"):
        odl_step(x, D, torch.randn(8, 16))
    with pytest.raises(ValueError, match="D and D1 must both be"):
        odl_step(x, torch.randn(9, 32), torch.randn(9, 32))
    with pytest.raises(ValueError, match="residual must have x's shape"):
        odl_step(x, D, D, residual=torch.randn(4, 9))
    with pytest.raises(TypeError, match="floating point"):
        odl_step(x.long(), D, D, impl="torch")
    with pytest.raises(ValueError, match="impl must be"):
        odl_step(x, D, D, impl="cuda")
    with pytest.raises(ValueError, match="one device"):           # a cpu @ meta matmul returns garbage
        odl_step(x, D.to("meta"), D, impl="torch")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        odl_step(x.double().to(KERNEL_DEVICE), D.double().to(KERNEL_DEVICE), D.double().to(KERNEL_DEVICE),
                 impl="triton")
    if KERNEL_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
            odl_step(x, D, D, impl="triton")


def test_odl_auto_and_default_arguments():
    """auto is the torch path off CUDA; step size and lambda default to CRATE-alpha's 0.1 and are honoured."""
    x, D, D1, r, _ = odl_inputs((17,), 32, torch.float64, "cpu")
    out = odl_step(x.requires_grad_(), D, D1, residual=r)
    assert out.grad_fn.next_functions[0][0].name() == "_ODLBackward"       # under the view to x's shape
    assert_rel(out, odl_reference(x, D, D1, r), FP64_RTOL)
    assert_rel(odl_step(x, D, D1, 0.05, 0.2, impl="torch"), odl_step_ref(x, D, D1, 0.05, 0.2), FP64_RTOL)


def test_odl_opcheck():
    """Schema, fake kernel, autograd registration and AOT dispatch of the registered op."""
    from crate_fast.kernels import odl  # noqa: F401  (registers the op)
    xc = torch.randn(9, 32, device=KERNEL_DEVICE, requires_grad=True)
    dc, d1c = (torch.randn(32, 128, device=KERNEL_DEVICE) * 0.2 for _ in range(2))
    r = torch.randn(9, 32, device=KERNEL_DEVICE, requires_grad=True)
    for recompute in (False, True):
        torch.library.opcheck(torch.ops.crate_fast.odl_fwd.default,
                              (xc, dc.requires_grad_(), d1c, r, 0.1, 0.1, recompute))
        torch.library.opcheck(torch.ops.crate_fast.odl_fwd.default, (xc, dc, d1c, None, 0.1, 0.1, recompute))
    bf = [t.detach().bfloat16().requires_grad_() for t in (xc, dc, d1c)]        # 16-bit GEMMs, fp32 stream
    torch.library.opcheck(torch.ops.crate_fast.odl_fwd.default, (*bf, r, 0.1, 0.1, False))


def test_odl_torch_compile_fullgraph():
    """Both fast paths trace into one graph (the Triton op, or the torch path's autograd Function)."""
    def f(x, D, D1, r):
        return (odl_step(x, D, D1, residual=r, impl="triton").sum() + odl_step(x, D, D1, impl="torch").sum()
                + odl_step(x, D, D1, recompute=True, impl="triton").sum())

    *inputs, _ = odl_inputs((17,), 32, torch.float32, KERNEL_DEVICE)
    inputs = [t.requires_grad_() for t in inputs]
    compiled = torch.compile(f, fullgraph=True)          # fullgraph: any graph break is an error
    got = compiled(*inputs)
    got.backward()
    grads = [t.grad.clone() for t in inputs]
    for t in inputs:
        t.grad = None
    want = f(*inputs)
    want.backward()
    assert_rel(got.detach().cpu(), want.detach().cpu())
    for g, t in zip(grads, inputs, strict=True):
        assert_rel(g.cpu(), t.grad.cpu())
