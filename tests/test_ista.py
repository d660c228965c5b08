"""ISTA step against the float64 reference (the official 3-matmul form), for every fast implementation."""
import math

import pytest
import torch
from harness import assert_2x_rule, assert_rel, check_all, run_grads
from inputs import device_for, ista_inputs
from tolerances import AUTOCAST_ATOL, FP64_RTOL

from crate_fast.kernels import ista_step, ista_step_ref
from crate_fast.kernels.torch_ops import ista_uses_operator_form

# (leading shape, C): odd row counts, C off the block sizes, CRATE widths scaled down for the interpreter.
# impl="torch" takes the direct two-GEMM form for M < C rows and the operator form for M >= C
# (test_ista_torch_form_follows_rows_and_width): the first, third and fourth shapes are direct, the
# others operator form.
SHAPES = [((3, 17), 64), ((65,), 48), ((2, 5, 7), 100), ((1, 1), 32), ((3, 65), 96)]
IMPLS = ["torch", "triton"]
OPERATOR, DIRECT = "_ISTAApplyBackward", "_ISTADirectBackward"     # the torch path's autograd nodes


def torch_form(lead, C) -> str:
    """The autograd node that ista_step(impl="torch") builds for x of shape (*lead, C): which form ran."""
    out = ista_step(torch.randn(*lead, C, requires_grad=True), torch.randn(C, C), impl="torch")
    return out.grad_fn.next_functions[0][0].name()          # under the final view to x's shape


def test_ista_torch_form_follows_rows_and_width():
    """The operator form from M = C rows on (where it needs fewer FLOPs), the direct form below; the
    shapes of the parity tests exercise both."""
    forms = {(lead, C): torch_form(lead, C) for lead, C in SHAPES}
    assert forms == {(lead, C): OPERATOR if ista_uses_operator_form(math.prod(lead), C) else DIRECT
                     for lead, C in SHAPES}
    assert [forms[s] for s in SHAPES] == [DIRECT, OPERATOR, DIRECT, DIRECT, OPERATOR]
    assert torch_form((64,), 64) == OPERATOR and torch_form((63,), 64) == DIRECT      # the boundary M = C
    assert torch_form((2, 32), 64) == OPERATOR and torch_form((0,), 64) == DIRECT


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead,C", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ista_matches_reference(impl, lead, C, dtype):
    dev = device_for(impl)
    x, W = ista_inputs(lead, C, dtype, dev)
    dout = torch.randn(x.shape, dtype=dtype, device=dev)
    got = run_grads(lambda a, b: ista_step(a, b, impl=impl), x, W, grad=dout)
    truth = run_grads(ista_step_ref, x.double().cpu(), W.double().cpu(), grad=dout.double().cpu())
    plain = run_grads(ista_step_ref, x.cpu(), W.cpu(), grad=dout.cpu())     # plain PyTorch, same dtype
    assert 0.3 < (truth[0] > 0).double().mean() < 0.7, "test input should exercise both ReLU branches"
    assert all(g.dtype == dtype for g in got)
    check_all(("out", "dx", "dW"), got, plain, truth)


@pytest.mark.parametrize("lead,C,form", [((3, 17), 64, DIRECT), ((65,), 48, OPERATOR), ((63,), 64, DIRECT),
                                         ((64,), 64, OPERATOR)])
def test_ista_torch_float64_is_exact(lead, C, form):
    assert torch_form(lead, C) == form
    x, W = ista_inputs(lead, C, torch.float64, "cpu")
    dout = torch.randn(x.shape, dtype=torch.float64)
    got = run_grads(lambda a, b: ista_step(a, b, impl="torch"), x, W, grad=dout)
    ref = run_grads(ista_step_ref, x, W, grad=dout)
    for name, g, r in zip(("out", "dx", "dW"), got, ref, strict=True):
        assert_rel(g, r, FP64_RTOL, name)


@pytest.mark.parametrize("impl", ["torch", "reference"])
def test_ista_zero_preactivation_and_lambda(impl):
    """Exactly-zero pre-activations give zero output and zero gradient (ReLU'(0) = 0, as autograd)."""
    C = 16
    W = torch.zeros(C, C, dtype=torch.float64, requires_grad=True)
    x = torch.full((4, C), 0.05, dtype=torch.float64, requires_grad=True)
    out = ista_step(x, W, step_size=0.5, lambd=0.1, impl=impl)   # 0.05 + 0 - 0.5 * 0.1 == 0 exactly
    assert (out == 0).all()
    out.sum().backward()
    assert (x.grad == 0).all() and (W.grad == 0).all()
    assert_rel(ista_step(x, W, 0.1, 0.5, impl=impl), ista_step_ref(x, W, 0.1, 0.5))   # CRATE-MAE lambda


def test_ista_input_errors():
    with pytest.raises(ValueError, match="weight must be"):
        ista_step(torch.randn(4, 8), torch.randn(8, 9))
    with pytest.raises(TypeError, match="floating point"):
        ista_step(torch.ones(4, 8, dtype=torch.long), torch.randn(8, 8), impl="torch")


def test_ista_computes_in_the_activation_dtype_with_a_higher_precision_dictionary():
    x, W = ista_inputs((5,), 32, torch.float64, "cpu")
    W = W.requires_grad_()
    out = ista_step(x.float(), W, impl="torch")
    assert out.dtype == torch.float32
    assert_rel(out, ista_step_ref(x, W.detach()))
    out.sum().backward()
    assert W.grad.dtype == torch.float64


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lead,C,form", [((3, 65), 96, OPERATOR), ((3, 17), 64, DIRECT)], ids=["operator", "direct"])
def test_ista_autocast_keeps_the_residual_stream_in_fp32(impl, lead, C, form):
    """Under autocast the official code's x + update runs in fp32 (only the GEMMs are bf16); so do we,
    in both forms of the torch path."""
    assert torch_form(lead, C) == form
    dev = device_for(impl)
    x, W = ista_inputs(lead, C, torch.float64, dev)
    dout = torch.randn(x.shape, dtype=torch.float64, device=dev)
    truth = run_grads(ista_step_ref, x.cpu(), W.cpu(), grad=dout.cpu())
    got, plain = [], []
    for fn, res in ((lambda a, b: ista_step(a, b, impl=impl), got), (ista_step_ref, plain)):
        with torch.autocast(dev, dtype=torch.bfloat16):
            res.extend(run_grads(fn, x.float(), W.float(), grad=dout.float()))
    assert got[0].dtype == plain[0].dtype == torch.float32 and got[2].dtype == torch.float32
    for name, g, p, t in zip(("out", "dx", "dW"), got, plain, truth, strict=True):
        assert_2x_rule(g, p, t, what=name, atol=AUTOCAST_ATOL)
