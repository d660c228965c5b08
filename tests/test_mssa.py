"""MSSA attention (tied q = k = v) against the float64 reference, for every fast implementation."""
import pytest
import torch
from harness import assert_rel, check_all, run_grads
from inputs import device_for
from tolerances import FP64_RTOL

from crate_fast.kernels import mssa_attention, mssa_attention_ref

# (B, H, N, D): odd B*H, N off every block size, head dims 48 (CRATE-S, padded in-kernel) and 64.
SHAPES = [(1, 3, 17, 48), (3, 1, 65, 64), (1, 1, 1, 64), (1, 3, 80, 48), (1, 1, 197, 64), (3, 1, 65, 48)]
IMPLS = ["torch", "triton"]


def head_split(B, H, N, D, dtype, device):
    """w as the model produces it: a strided (B, H, N, D) view of the (B, N, H*D) projection."""
    x = torch.randn(B, N, H * D, dtype=torch.float64)
    return x.to(device=device, dtype=dtype).view(B, N, H, D).transpose(1, 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mssa_matches_reference(impl, shape, dtype):
    dev = device_for(impl)
    w = head_split(*shape, dtype, dev)
    do = torch.randn(w.shape, dtype=dtype, device=dev)
    got = run_grads(lambda t: mssa_attention(t, impl=impl), w, grad=do)     # run_grads keeps w's strides
    truth = run_grads(mssa_attention_ref, w.double().cpu(), grad=do.double().cpu())
    plain = run_grads(mssa_attention_ref, w.cpu(), grad=do.cpu())          # plain PyTorch, same dtype
    assert all(g.dtype == dtype for g in got)
    check_all(("out", "dw"), got, plain, truth)


@pytest.mark.parametrize("shape", [(3, 1, 65, 64), (1, 3, 17, 48)])
def test_mssa_torch_float64_is_exact(shape):
    w = head_split(*shape, torch.float64, "cpu")
    do = torch.randn(w.shape, dtype=torch.float64)
    got = run_grads(lambda t: mssa_attention(t, impl="torch"), w, grad=do)
    ref = run_grads(mssa_attention_ref, w, grad=do)
    for name, g, r in zip(("out", "dw"), got, ref, strict=True):
        assert_rel(g, r, FP64_RTOL, name)


def test_mssa_custom_scale_and_contiguous_input():
    w = torch.randn(1, 3, 17, 64)
    for impl in ("torch", "reference"):
        assert_rel(mssa_attention(w, scale=0.3, impl=impl), mssa_attention_ref(w.double(), 0.3))


def test_mssa_autocast_casts_like_linear():
    w = torch.randn(1, 3, 17, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mssa_attention(w, impl="torch")
    assert out.dtype == torch.bfloat16


def test_mssa_input_errors():
    with pytest.raises(ValueError, match="B, H, N, D"):
        mssa_attention(torch.randn(3, 17, 64))
    with pytest.raises(TypeError, match="floating-point"):
        mssa_attention(torch.ones(1, 1, 4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="impl must be"):
        mssa_attention(torch.randn(1, 1, 4, 8), impl="cuda")
