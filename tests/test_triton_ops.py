"""Triton-op plumbing: unwritten outputs, torch.library registration (opcheck), torch.compile, limits,
and non-finite inputs (NaN and Inf land where the reference puts them, for every impl).

On a machine without a GPU these run the kernels under TRITON_INTERPRET=1 (set in conftest).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, KERNEL_DEVICE
from harness import assert_rel, run_grads
from inputs import assert_same_nonfinite, attention, device_for, numpy_nan_warnings, poisoned
from tolerances import BF16_HEAD_DIM_128_ATOL

from crate_fast.kernels import ista_step, ista_step_ref, mssa_attention, mssa_attention_ref
from crate_fast.kernels.torch_ops import ista_uses_operator_form

DEV = KERNEL_DEVICE


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(1, 3, 17, 48), (3, 1, 33, 64)])
def test_mssa_writes_every_element(poisoned_allocations, shape, causal):
    w = torch.randn(*shape, device=DEV, requires_grad=True)
    out = mssa_attention(w, causal=causal, impl="triton")
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(w.grad).all()
    w64 = w.detach().double().cpu().requires_grad_()
    assert_rel(out.detach().cpu(), mssa_attention_ref(w64, causal=causal))


@pytest.mark.parametrize("lead,C", [((37,), 48), ((2, 9), 100)])
def test_ista_writes_every_element(poisoned_allocations, lead, C):
    x = torch.randn(*lead, C, device=DEV, requires_grad=True)
    W = (torch.randn(C, C, device=DEV) * C ** -0.5).requires_grad_()
    out = ista_step(x, W, impl="triton")
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(W.grad).all()


def test_mssa_bf16_head_dim_128_and_fp32_limit():
    w = torch.randn(1, 1, 17, 128, device=DEV)
    out = mssa_attention(w.bfloat16(), impl="triton")
    assert (out.float().cpu() - mssa_attention_ref(w.double().cpu())).abs().max() < BF16_HEAD_DIM_128_ATOL
    with pytest.raises(NotImplementedError, match="fp32 with head dim 128"):
        mssa_attention(w, impl="triton")
    with pytest.raises(NotImplementedError, match="head dim 160"):
        mssa_attention(torch.randn(1, 1, 4, 160, device=DEV), impl="triton")


def test_triton_rejects_unsupported_dtype():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        mssa_attention(torch.randn(1, 1, 4, 16, dtype=torch.float64, device=DEV), impl="triton")
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ista_step(torch.randn(4, 16, dtype=torch.float64, device=DEV), torch.randn(16, 16, device=DEV),
                  impl="triton")


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        mssa_attention(torch.randn(1, 1, 4, 16), impl="triton")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        ista_step(torch.randn(4, 16), torch.randn(16, 16), impl="triton")


def test_impl_names_and_auto_decided_once():
    from crate_fast.kernels import IMPLS, check_impl
    from crate_fast.kernels._dispatch import _choose_once
    assert IMPLS == ("auto", "reference", "torch", "triton") and all(check_impl(i) == i for i in IMPLS)
    with pytest.raises(ValueError, match="impl must be"):
        check_impl("cuda")
    with pytest.raises(ValueError, match="impl must be"):
        ista_step(torch.randn(2, 8), torch.randn(8, 8), impl="cuda")
    # "auto" is decided once per (op, device type, dtypes, head dim), not on every call.
    mssa_attention(torch.randn(1, 2, 5, 8, device=DEV))
    decided = _choose_once.cache_info().misses
    mssa_attention(torch.randn(2, 3, 7, 8, device=DEV))
    assert _choose_once.cache_info().misses == decided


def test_opcheck_registrations():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of the three ops."""
    from crate_fast.kernels import ista, mssa  # noqa: F401  (registers the ops)
    w = torch.randn(1, 3, 17, 48, device=DEV, requires_grad=True)
    for causal in (False, True):
        o, lse = torch.ops.crate_fast.mssa_fwd(w.detach(), 0.2, causal)
        torch.library.opcheck(torch.ops.crate_fast.mssa_fwd.default, (w, 0.2, causal))
        torch.library.opcheck(torch.ops.crate_fast.mssa_bwd.default,
                              (w.detach(), o, lse, torch.randn_like(o), 0.2, causal))
    x = torch.randn(9, 48, device=DEV, requires_grad=True)
    W = torch.randn(48, 48, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.crate_fast.ista_apply.default, (x, None, W, 0.1, 0.1))
    xb = x.detach().bfloat16().requires_grad_()                         # 16-bit GEMM, fp32 residual
    torch.library.opcheck(torch.ops.crate_fast.ista_apply.default, (x, xb, W.detach().bfloat16(), 0.1, 0.1))


def test_torch_compile_keeps_triton_ops_in_one_graph():
    def f(w, x, W):
        return (mssa_attention(w, impl="triton").sum() + ista_step(x, W, impl="triton").sum()
                + (mssa_attention(w, causal=True, impl="triton") * w).sum())

    compiled = torch.compile(f, fullgraph=True)          # fullgraph: any graph break is an error
    w = torch.randn(1, 2, 17, 32, device=DEV, requires_grad=True)
    x = torch.randn(5, 32, device=DEV, requires_grad=True)
    W = torch.randn(32, 32, device=DEV, requires_grad=True)
    ref = f(w, x, W)
    ref.backward()
    want = [t.grad.clone() for t in (w, x, W)]
    for t in (w, x, W):
        t.grad = None
    got = compiled(w, x, W)
    assert_rel(got.detach().cpu(), ref.detach().cpu())
    got.backward()
    for g, t in zip(want, (w, x, W), strict=True):
        assert_rel(t.grad.cpu(), g.cpu())


@pytest.mark.parametrize("recompute", [False, True])
def test_torch_compile_causal_torch_path_fullgraph(recompute):
    f = torch.compile(lambda w: mssa_attention(w, causal=True, impl="torch", recompute=recompute), fullgraph=True)
    w = torch.randn(1, 2, 9, 8, dtype=torch.float64, requires_grad=True)
    out = f(w)
    out.backward(torch.ones_like(out))
    w64 = w.detach().clone().requires_grad_()
    ref = mssa_attention_ref(w64, causal=True)
    ref.backward(torch.ones_like(ref))
    assert_rel(out.detach(), ref.detach(), 1e-10)
    assert_rel(w.grad, w64.grad, 1e-10)


def test_torch_compile_model_with_torch_impl():
    from crate_fast import create_model
    torch.manual_seed(0)
    model = create_model("crate_tiny", num_classes=3, img_size=16, patch_size=4, depth=2, dim=64, heads=2,
                         impl="torch")
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    assert_rel(out.detach(), ref.detach())
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# Non-finite inputs (inputs.py: poisoned, assert_same_nonfinite). Each kernel puts NaN and +-Inf exactly
# where its reference twin does, in the output and in every gradient.
# ------------------------------------------------------------------------------------------------
# One token row poisoned: a single element ("nan") or the whole row ("nan_row", "+inf_row", "-inf_row").
ROW_POISONS = ["nan", "nan_row", "+inf_row", "-inf_row"]


@numpy_nan_warnings
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("impl", ["torch", "torch_recompute", "triton"])
@pytest.mark.parametrize("poison", ROW_POISONS + ["+inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mssa_nonfinite_like_reference(impl, poison, dtype, causal):
    # One token of head (0, 1) poisoned (N = 37: row 33 sits in the masked tail blocks of the
    # interpreter's tiles). Its score row and column are non-finite, so that head's softmax rows
    # are NaN, or, for a -Inf score, exactly 0 in a column whose value row holds an Inf (0 * Inf = NaN).
    # Causal: the reference's attn @ w also multiplies the masked zeros P[i, 33] (i < 33) by w[33], so
    # its column(s) of rows 0-32 are NaN too, in blocks whose tiles the kernel never loads.
    w = poisoned(torch.randn(2, 3, 37, 32), (0, 1, 33), poison).to(device_for(impl), dtype)
    g = torch.randn(w.shape, device=w.device).to(dtype)
    got = run_grads(lambda t: attention(t, impl, causal=causal), w, grad=g)
    ref = run_grads(lambda t: mssa_attention_ref(t, causal=causal), w.cpu(), grad=g.cpu())
    assert ref[0][1].isfinite().all(), "the other heads stay finite"
    if causal:
        assert ref[0][0, 1, :33].isnan().any(), "the reference's NaN reaches rows before the poisoned token"
    assert_same_nonfinite(("out", "dw"), got, ref)


@numpy_nan_warnings
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("impl", ["torch", "torch_recompute", "triton"])
@pytest.mark.parametrize("poison", ROW_POISONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mssa_upstream_nonfinite_like_reference(impl, poison, dtype, causal):
    """A NaN in the upstream gradient of token 5 (one element or the row), or a row of +-Inf: dw has
    NaN and +-Inf where the reference's has them. Causal: the reference's P^T dO multiplies the masked
    zeros P[5, j] (j > 5) by dO[5], so dw[j > 5] is NaN in those columns, far past the kernel's diagonal
    tiles of row 5."""
    w = torch.randn(2, 3, 37, 32).to(device_for(impl), dtype)
    g = poisoned(torch.randn(w.shape), (0, 1, 5), poison).to(w.device, dtype)
    got = run_grads(lambda t: attention(t, impl, causal=causal), w, grad=g)
    ref = run_grads(lambda t: mssa_attention_ref(t, causal=causal), w.cpu(), grad=g.cpu())
    assert ref[1][1].isfinite().all() and not ref[1][0, 1].isfinite().all()
    assert_same_nonfinite(("out", "dw"), got, ref)


@numpy_nan_warnings
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("poison", ["+inf", "-inf"])
def test_mssa_triton_lone_upstream_inf_nonfinite_where_reference(poison, causal):
    """A lone +-Inf in the upstream gradient: the kernels' delta = dO . O (FlashAttention's) is +-Inf
    where the reference's rowsum(P dP) sums Infs of both signs (or 0 * Inf) to NaN. dw is non-finite
    exactly where the reference's is; NaN and +-Inf may trade places (mssa.py). The torch path matches
    exactly (test_mssa_torch_lone_upstream_inf_like_reference)."""
    w = torch.randn(2, 3, 37, 32)
    g = poisoned(torch.randn(w.shape), (0, 1, 5), poison)
    got = run_grads(lambda t: mssa_attention(t, causal=causal, impl="triton"), w.to(DEV), grad=g.to(DEV))
    ref = run_grads(lambda t: mssa_attention_ref(t, causal=causal), w, grad=g)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a.cpu().isfinite(), b.isfinite())


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("poison", ["+inf", "-inf"])
def test_mssa_torch_lone_upstream_inf_like_reference(poison, causal):
    w = torch.randn(2, 3, 37, 32)
    g = poisoned(torch.randn(w.shape), (0, 1, 5), poison)
    got = run_grads(lambda t: mssa_attention(t, causal=causal, impl="torch"), w, grad=g)
    ref = run_grads(lambda t: mssa_attention_ref(t, causal=causal), w, grad=g)
    assert_same_nonfinite(("out", "dw"), got, ref)


@numpy_nan_warnings
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_mssa_first_key_blocks_all_minus_inf(impl, causal):
    """Rows whose scores over the first 64 keys (a whole key block at every admitted tile size) are all
    -Inf, and finite further on: the softmax is finite there, as in the reference; an online softmax
    whose running max is still -Inf must not compute exp(-inf - (-inf)) = NaN for them."""
    w = torch.randn(1, 1, 80, 32)
    w[0, 0, :64, 0] = math.inf            # keys 0-63: score -Inf for every query with w[..., 0] < 0
    w = w.to(device_for(impl))
    g = torch.randn(w.shape, device=w.device)
    got = run_grads(lambda t: attention(t, impl, causal=causal), w, grad=g)
    ref = run_grads(lambda t: mssa_attention_ref(t, causal=causal), w.cpu(), grad=g.cpu())
    assert ref[0].isfinite().any(), "the test needs output rows that stay finite"
    assert_same_nonfinite(("out", "dw"), got, ref)


def _ista_poisoned(lead, C, where, index, poison):
    """x (*lead, C), W at the official init scale and an upstream gradient; x, W or dout poisoned."""
    x, W = torch.randn(*lead, C), (torch.rand(C, C) * 2 - 1) * (6 / C) ** 0.5   # official init scale
    dout = torch.randn(x.shape)
    if where == "x":
        x = poisoned(x, index, poison)
    elif where == "W":
        W = poisoned(W, index, poison)
    else:
        dout = poisoned(dout, index, poison)
    return x, W, dout


# The torch path's two forms (torch_ops.py): the operator form x (W - W^T W) for M >= C token rows, the
# direct form (x - x W^T) W for fewer. 3 x 17 = 51 rows of width 48: operator; 2 x 5 = 10: direct.
OPERATOR_LEAD, DIRECT_LEAD, WIDTH = (3, 17), (2, 5), 48
ROW_POISON_CASES = ([("x", p) for p in ROW_POISONS] + [("dout", p) for p in ROW_POISONS]
                    + [("W", "nan"), ("W", "nan_row")])


def test_ista_nonfinite_tests_cover_both_torch_forms():
    assert ista_uses_operator_form(math.prod(OPERATOR_LEAD), WIDTH)
    assert not ista_uses_operator_form(math.prod(DIRECT_LEAD), WIDTH)


@numpy_nan_warnings
@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("where,poison", ROW_POISON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ista_nonfinite_like_reference(impl, where, poison, dtype):
    """One row of x (a token), of the upstream gradient, or (NaN) of W poisoned; the torch path in its
    operator form, as the kernel. Inf in W, and a lone Inf in x: test_ista_triton_nonfinite_like_torch."""
    dev = device_for(impl)
    x, W, dout = _ista_poisoned(OPERATOR_LEAD, WIDTH, where, (7,) if where == "W" else (1, 5), poison)
    x, W, dout = (t.to(dev, dtype) for t in (x, W, dout))
    got = run_grads(lambda a, b: ista_step(a, b, impl=impl), x, W, grad=dout)
    ref = run_grads(ista_step_ref, x.cpu(), W.cpu(), grad=dout.cpu())
    assert_same_nonfinite(("out", "dx", "dW"), got, ref)


@pytest.mark.parametrize("where,poison", ROW_POISON_CASES + [("x", "+inf"), ("x", "-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ista_torch_direct_form_nonfinite_like_reference(where, poison, dtype):
    """The torch path's direct form (fewer rows than the width) puts NaN and +-Inf where the reference
    does for every poison of test_ista_nonfinite_like_reference, and also for a lone Inf in x, which the
    operator form places otherwise (test_ista_triton_nonfinite_like_torch)."""
    x, W, dout = _ista_poisoned(DIRECT_LEAD, WIDTH, where, (7,) if where == "W" else (1, 3), poison)
    x, W, dout = (t.to(dtype) for t in (x, W, dout))
    got = run_grads(lambda a, b: ista_step(a, b, impl="torch"), x, W, grad=dout)
    ref = run_grads(ista_step_ref, x, W, grad=dout)
    assert_same_nonfinite(("out", "dx", "dW"), got, ref)


@numpy_nan_warnings
@pytest.mark.parametrize("where,index", [("x", (1, 5)), ("W", (7,))])
@pytest.mark.parametrize("poison", ["nan", "+inf", "-inf", "+inf_row", "-inf_row"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ista_triton_nonfinite_like_torch(where, index, poison, dtype):
    """The fused kernel gives the NaN/Inf pattern of the torch path's operator form (51 rows of width 48,
    test_ista_nonfinite_tests_cover_both_torch_forms), the kernel's own form, for every poison.

    A lone Inf in x, or an Inf in W, is where both operator-form paths differ from the 3-product
    reference: there Inf meets Inf with opposite signs in different products (x W^T W against
    x (W - W^T W)), so the reference's NaN is sometimes +-Inf here and vice versa (a NaN anywhere, or a
    whole row of Inf, propagates identically: test_ista_nonfinite_like_reference)."""
    x, W, dout = _ista_poisoned(OPERATOR_LEAD, WIDTH, where, index, poison)
    x, W, dout = (t.to(dtype) for t in (x, W, dout))
    got = run_grads(lambda a, b: ista_step(a, b, impl="triton"), *(t.to(KERNEL_DEVICE) for t in (x, W)),
                    grad=dout.to(KERNEL_DEVICE))
    ref = run_grads(lambda a, b: ista_step(a, b, impl="torch"), x, W, grad=dout)
    assert_same_nonfinite(("out", "dx", "dW"), got, ref)


@numpy_nan_warnings
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_model_nan_pixel_gives_nan_loss_and_reference_gradients(impl):
    """One NaN pixel: that image's logits and the loss are NaN, the other image's logits stay finite,
    and every parameter gradient has NaN/Inf exactly where the reference model's has them."""
    from crate_fast import create_model
    kw = dict(num_classes=3, img_size=16, patch_size=4, depth=1, dim=64, heads=2)
    model = create_model("crate_tiny", impl=impl, **kw).to(device_for(impl))
    ref = create_model("crate_tiny", impl="reference", **kw)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 16, 16)
    x[1, 0, 5, 7] = math.nan
    y = torch.tensor([0, 2])
    runs = []
    for m, dev in ((model, device_for(impl)), (ref, "cpu")):
        logits = m(x.to(dev))
        F.cross_entropy(logits, y.to(dev)).backward()
        runs.append([logits.detach()] + [p.grad for p in m.parameters()])
    got, want = runs
    assert got[0][0].isfinite().all() and got[0][1].isnan().all()
    assert F.cross_entropy(got[0].cpu(), y).isnan()
    names = ["logits"] + [n for n, _ in model.named_parameters()]
    assert_same_nonfinite(names, got, want)


def test_torch_compile_traces_a_scale_that_changed_between_calls():
    """Dynamo turns a float argument that changed between calls into a symbolic float; the public op's
    checks on it must still trace (math.isfinite on it broke fullgraph compiles after another model)."""
    f = torch.compile(lambda w, s: mssa_attention(w, scale=s, impl="torch"), fullgraph=True)
    w = torch.randn(1, 2, 5, 8)
    for s in (0.3, 0.5, 0.7):
        assert_rel(f(w, s), mssa_attention_ref(w.double(), s))


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("op", ["mssa", "ista", "odl"])
def test_double_backward_is_an_error_not_a_silent_wrong_result(op, impl):
    """The hand-written backward passes are first-order: a second differentiation (Hessian-vector
    products, gradient penalties) raises, where it used to drop terms silently; impl="reference" gives it."""
    from crate_fast.kernels import odl_step

    dtype = torch.float64 if impl == "torch" else torch.float32
    dev = "cpu" if impl == "torch" else DEV
    x = torch.randn(5, 16, dtype=dtype, device=dev, requires_grad=True)
    D = torch.randn(16, 64, dtype=dtype, device=dev) * 0.2
    calls = {"mssa": lambda i: mssa_attention(x.view(1, 1, 5, 16), impl=i),
             "ista": lambda i: ista_step(x, D[:, :16], impl=i), "odl": lambda i: odl_step(x, D, D, impl=i)}
    g, = torch.autograd.grad(calls[op]("reference").pow(2).sum(), x, create_graph=True)
    g.pow(2).sum().backward()                                    # the literal form: any order
    assert x.grad is not None and torch.isfinite(x.grad).all()
    g, = torch.autograd.grad(calls[op](impl).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.pow(2).sum().backward()
