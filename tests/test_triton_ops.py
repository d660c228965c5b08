"""Triton-op plumbing: unwritten outputs, torch.library registration (opcheck), torch.compile, limits.

On a machine without a GPU these run the kernels under TRITON_INTERPRET=1 (set in conftest).
"""
import math

import pytest
import torch
from conftest import HAS_CUDA, KERNEL_DEVICE
from crate_fast.kernels import ista_step, mssa_attention, mssa_attention_ref
from tolerances import assert_rel

DEV = KERNEL_DEVICE


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Every float buffer the kernels allocate starts as NaN, so an unwritten element shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_fill(empty_like(*a, **k)))


@pytest.mark.parametrize("shape", [(1, 3, 17, 48), (3, 1, 33, 64)])
def test_mssa_writes_every_element(poisoned_allocations, shape):
    w = torch.randn(*shape, device=DEV, requires_grad=True)
    out = mssa_attention(w, impl="triton")
    out.backward(torch.randn_like(out))
    assert torch.isfinite(out).all() and torch.isfinite(w.grad).all()
    w64 = w.detach().double().cpu().requires_grad_()
    assert_rel(out.detach().cpu(), mssa_attention_ref(w64))


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
    assert (out.float().cpu() - mssa_attention_ref(w.double().cpu())).abs().max() < 0.05
    with pytest.raises(NotImplementedError, match="fp32 with head dim 128"):
        mssa_attention(w, impl="triton")
    with pytest.raises(NotImplementedError, match="head dim 160"):
        mssa_attention(torch.randn(1, 1, 4, 160, device=DEV), impl="triton")


def test_triton_rejects_unsupported_dtype():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        mssa_attention(torch.randn(1, 1, 4, 16, dtype=torch.float64, device=DEV), impl="triton")


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs a CUDA tensor"):
        mssa_attention(torch.randn(1, 1, 4, 16), impl="triton")


def test_opcheck_registrations():
    """Schema, fake (meta) kernels, autograd registration and AOT dispatch of the three ops."""
    from crate_fast.kernels import ista, mssa  # noqa: F401  (registers the ops)
    w = torch.randn(1, 3, 17, 48, device=DEV, requires_grad=True)
    o, lse = torch.ops.crate_fast.mssa_fwd(w.detach(), 0.2)
    torch.library.opcheck(torch.ops.crate_fast.mssa_fwd.default, (w, 0.2))
    torch.library.opcheck(torch.ops.crate_fast.mssa_bwd.default, (w.detach(), o, lse, torch.randn_like(o), 0.2))
    x = torch.randn(9, 48, device=DEV, requires_grad=True)
    W = torch.randn(48, 48, device=DEV, requires_grad=True)
    torch.library.opcheck(torch.ops.crate_fast.ista_apply.default, (x, None, W, 0.1, 0.1))
    xb = x.detach().bfloat16().requires_grad_()                         # 16-bit GEMM, fp32 residual
    torch.library.opcheck(torch.ops.crate_fast.ista_apply.default, (x, xb, W.detach().bfloat16(), 0.1, 0.1))


def test_torch_compile_keeps_triton_ops_in_one_graph():
    def f(w, x, W):
        return mssa_attention(w, impl="triton").sum() + ista_step(x, W, impl="triton").sum()

    compiled = torch.compile(f, fullgraph=True)          # fullgraph: any graph break is an error
    w = torch.randn(1, 2, 17, 32, device=DEV, requires_grad=True)
    x = torch.randn(5, 32, device=DEV, requires_grad=True)
    W = torch.randn(32, 32, device=DEV, requires_grad=True)
    ref = f(w, x, W)
    got = compiled(w, x, W)
    assert_rel(got.detach().cpu(), ref.detach().cpu(), 1e-5)
    got.backward()
    assert w.grad is not None and W.grad is not None and torch.isfinite(x.grad).all()


def test_torch_compile_model_with_torch_impl():
    from crate_fast import create_model
    torch.manual_seed(0)
    model = create_model("crate_tiny", num_classes=3, img_size=16, patch_size=4, depth=2, dim=64, heads=2,
                         impl="torch")
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    assert_rel(out.detach(), ref.detach(), 1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
