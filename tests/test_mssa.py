"""MSSA attention (tied q = k = v) against the float64 reference, for every fast implementation."""
import pytest
import torch
from harness import assert_rel, check_all, run_grads
from inputs import attention, device_for
from tolerances import FP64_RTOL

from crate_fast.kernels import mssa_attention, mssa_attention_ref

# (B, H, N, D): odd B*H, N off every block size, head dims 48 (CRATE-S, padded in-kernel) and 64.
SHAPES = [(1, 3, 17, 48), (3, 1, 65, 64), (1, 1, 1, 64), (1, 3, 80, 48), (1, 1, 197, 64), (3, 1, 65, 48)]
IMPLS = ["torch", "torch_recompute", "triton"]     # torch_recompute: inputs.attention


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
    got = run_grads(lambda t: attention(t, impl), w, grad=do)              # run_grads keeps w's strides
    truth = run_grads(mssa_attention_ref, w.double().cpu(), grad=do.double().cpu())
    plain = run_grads(mssa_attention_ref, w.cpu(), grad=do.cpu())          # plain PyTorch, same dtype
    assert all(g.dtype == dtype for g in got)
    check_all(("out", "dw"), got, plain, truth)


@pytest.mark.parametrize("impl", ["torch", "torch_recompute"])
@pytest.mark.parametrize("shape", [(3, 1, 65, 64), (1, 3, 17, 48)])
def test_mssa_torch_float64_is_exact(shape, impl):
    w = head_split(*shape, torch.float64, "cpu")
    do = torch.randn(w.shape, dtype=torch.float64)
    got = run_grads(lambda t: attention(t, impl), w, grad=do)
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


# ------------------------------------------------------------------------------------------------
# Causal attention (CRATE-GPT): query i attends to keys j <= i, against the float64 masked softmax.
# ------------------------------------------------------------------------------------------------
# T off every block size, the CRATE-GPT context 1024 (the interpreter runs it for one head: slow).
CAUSAL_T = [1, 2, 17, 64, 80, 197, pytest.param(1024, marks=pytest.mark.slow)]


def causal_ref(w, scale=None):
    return mssa_attention_ref(w, scale, causal=True)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N", CAUSAL_T)
@pytest.mark.parametrize("D", [48, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mssa_causal_matches_reference(impl, N, D, dtype, poisoned_allocations):
    """Outputs and dw, every buffer the path allocates poisoned with NaN (an unwritten element fails)."""
    if impl == "triton" and N == 1024 and D == 48 and not torch.cuda.is_available():
        pytest.skip("the interpreter takes 20 s here: head dim 48's padding is checked at every other T, and "
                    "at T = 1024 by tests/test_gpu_shapes.py on a GPU")
    B, H = (1, 3) if impl == "torch" or N <= 80 else (1, 1)      # the interpreter: one head at long T
    dev = device_for(impl)
    w = head_split(B, H, N, D, dtype, dev)
    do = torch.randn(w.shape, dtype=dtype, device=dev)
    got = run_grads(lambda t: attention(t, impl, causal=True), w, grad=do)
    truth = run_grads(causal_ref, w.double().cpu(), grad=do.double().cpu())
    plain = run_grads(causal_ref, w.cpu(), grad=do.cpu())
    assert all(g.dtype == dtype for g in got)
    check_all(("out", "dw"), got, plain, truth)


@pytest.mark.parametrize("impl", ["torch", "torch_recompute"])
@pytest.mark.parametrize("shape", [(3, 1, 65, 64), (1, 3, 17, 48)])
def test_mssa_causal_torch_float64_is_exact(shape, impl):
    w = head_split(*shape, torch.float64, "cpu")
    do = torch.randn(w.shape, dtype=torch.float64)
    got = run_grads(lambda t: attention(t, impl, causal=True), w, grad=do)
    ref = run_grads(causal_ref, w, grad=do)
    for name, g, r in zip(("out", "dw"), got, ref, strict=True):
        assert_rel(g, r, FP64_RTOL, name)


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mssa_causal_future_moves_no_past_output(impl, dtype):
    """w changed at positions >= t: every output row < t is bitwise the same (t = 33, 40: inside a
    key tile and at a tile edge of the interpreter's blocks), rows >= t move."""
    dev = device_for(impl)
    w = head_split(1, 3, 80, 48, dtype, dev)
    before = attention(w, impl, causal=True)
    for t in (33, 40):
        w2 = w.clone()
        w2[:, :, t:] = torch.randn(w2[:, :, t:].shape, device=dev).to(dtype)
        after = attention(w2, impl, causal=True)
        assert torch.equal(after[:, :, :t], before[:, :, :t])
        assert not torch.equal(after[:, :, t:], before[:, :, t:])


@pytest.mark.parametrize("causal", [False, True])
def test_mssa_torch_recompute_saves_the_log_sum_exp_not_the_probabilities(causal):
    """impl="torch" saves w and P (B H N N) for the backward; recompute=True saves w and one number per
    row (B H N), the same output within rounding (the forward forms P as exp(S - L) then)."""
    B, H, N, D = 2, 3, 40, 16
    w = head_split(B, H, N, D, torch.float32, "cpu").requires_grad_()

    def saved(recompute):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = mssa_attention(w, causal=causal, impl="torch", recompute=recompute)
        return out, sorted(sizes)

    (full, full_sizes), (lean, lean_sizes) = saved(False), saved(True)
    assert full_sizes == [B * H * N * D, B * H * N * N] and lean_sizes == [B * H * N, B * H * N * D]
    assert_rel(lean, full, 1e-6)


def test_mssa_causal_differs_from_full_but_for_the_last_query():
    w = torch.randn(1, 2, 9, 16)
    full, causal = mssa_attention(w, impl="torch"), mssa_attention(w, causal=True, impl="torch")
    assert_rel(causal[:, :, -1], full[:, :, -1])                  # the last query sees every key either way
    assert (causal[:, :, :-1] - full[:, :, :-1]).abs().amax() > 1e-3
    assert_rel(mssa_attention(w, causal=True, impl="reference"), causal_ref(w.double()))


def test_mssa_kernel_tiles_step_from_the_diagonal():
    """The causal kernels start their diagonal loop at a block's first row: BLOCK_M is a multiple of
    BLOCK_N (forward), BLOCK_J of BLOCK_I (backward), in every config row and the interpreter's."""
    from crate_fast.kernels import mssa
    fwd = [r.blocks for r in mssa._FWD_ROWS] + [c.kwargs for c in mssa.FWD_CONFIGS]
    bwd = [r.blocks for r in mssa._BWD_ROWS] + [c.kwargs for c in mssa.BWD_CONFIGS]
    assert all(b["BLOCK_M"] % b["BLOCK_N"] == 0 for b in fwd)
    assert all(b["BLOCK_J"] % b["BLOCK_I"] == 0 for b in bwd)
