"""crate_fast.training.optim: Lion against lion-pytorch, the warmup + cosine schedule."""
import pytest
import torch
from tolerances import LION_ATOL

from crate_fast.training.optim import Lion, lr_at


def test_lion_matches_lion_pytorch_step_for_step():
    lion_pytorch = pytest.importorskip("lion_pytorch")
    torch.manual_seed(0)
    a = [torch.randn(7, 5, requires_grad=True), torch.randn(3, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    ours = Lion(a, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.5)
    ref = lion_pytorch.Lion(b, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.5)
    for step in range(20):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(a, b, strict=True):
            torch.testing.assert_close(p, q, rtol=0, atol=LION_ATOL, msg=f"step {step}")


def test_lr_schedule_warmup_then_cosine():
    lrs = [lr_at(s, base_lr=1.0, total_steps=100, warmup_steps=10, min_lr=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:], strict=False)) and lrs[-1] == pytest.approx(0.1, abs=1e-3)
