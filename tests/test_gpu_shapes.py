"""The fused kernels at CRATE's real sizes on a GPU (skipped without one; the interpreter covers logic).

CRATE-S and CRATE-B attention at 224 px (N = 197, head dims 48 and 64), odd batch, causal attention at
CRATE-GPT's context (T = 1024, 12 heads of 64), the ISTA step at the
preset widths and CRATE-alpha's ODL block at its widths, fp32 and bf16, outputs and every gradient
against a float64 reference.
"""
import functools

import pytest
import torch
from harness import assert_2x_rule, assert_rel, check, check_all, run_grads
from inputs import ista_inputs, odl_compare, odl_inputs
from tolerances import AUTOCAST_ATOL

from crate_fast.kernels import ista_step, ista_step_ref, mssa_attention, mssa_attention_ref

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("H,D", [(12, 48), (12, 64), (6, 64), (16, 128)], ids=["S", "B", "T", "d128"])
@pytest.mark.parametrize("N", [197, 65, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_mssa_full_shapes(H, D, N, dtype):
    if dtype == torch.float32 and D > 64:
        pytest.skip("fp32 head dim > 64 is routed to the torch path")
    B = 5
    w = torch.randn(B, N, H * D, device="cuda").view(B, N, H, D).transpose(1, 2).to(dtype)
    g = torch.randn(B, H, N, D, device="cuda").to(dtype)
    got = run_grads(lambda t: mssa_attention(t, impl="triton"), w, grad=g)
    truth = run_grads(mssa_attention_ref, w.double(), grad=g.double())
    plain = run_grads(mssa_attention_ref, w, grad=g)
    check_all(("out", "dw"), got, plain, truth)


@pytest.mark.parametrize("H,D", [(12, 64), (12, 48), (16, 128)], ids=["gpt", "d48", "d128"])
@pytest.mark.parametrize("N", [1024, 197, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_mssa_causal_full_shapes(H, D, N, dtype):
    """Causal attention at CRATE-GPT's context (T = 1024, 12 heads of 64) and off the block sizes."""
    if dtype == torch.float32 and D > 64:
        pytest.skip("fp32 head dim > 64 is routed to the torch path")
    B = 3
    w = torch.randn(B, N, H * D, device="cuda").view(B, N, H, D).transpose(1, 2).to(dtype)
    g = torch.randn(B, H, N, D, device="cuda").to(dtype)
    got = run_grads(lambda t: mssa_attention(t, causal=True, impl="triton"), w, grad=g)
    truth = run_grads(lambda t: mssa_attention_ref(t, causal=True), w.double(), grad=g.double())
    plain = run_grads(lambda t: mssa_attention_ref(t, causal=True), w, grad=g)
    check_all(("out", "dw"), got, plain, truth)


@pytest.mark.parametrize("C", [384, 576, 768, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_ista_full_shapes(C, dtype):
    x, W = ista_inputs((5, 197), C, torch.float64, "cuda")
    g = torch.randn(x.shape, device="cuda", dtype=torch.float64)
    got = run_grads(lambda a, b: ista_step(a, b, impl="triton"), x.to(dtype), W.to(dtype), grad=g.to(dtype))
    truth = run_grads(ista_step_ref, x, W, grad=g)
    plain = run_grads(ista_step_ref, x.to(dtype), W.to(dtype), grad=g.to(dtype))
    check_all(("out", "dx", "dW"), got, plain, truth)


@pytest.mark.parametrize("d", [384, 768, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_odl_full_shapes(d, dtype):
    """CRATE-alpha S/B/L widths (m = 4d), 5 images of 197 tokens, with the residual stream."""
    *inputs, dout = odl_inputs((5, 197), d, dtype, "cuda")
    names, got, plain, truth = odl_compare("triton", inputs, dout)
    check_all(names, got, plain, truth)


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_odl_full_shapes_autocast(residual):
    """bf16 autocast at CRATE-alpha-B width: bf16 GEMMs, the fp32 residual stream (test_odl_autocast)."""
    *inputs, dout = odl_inputs((3, 197), 768, torch.float32, "cuda", residual)
    names, got, plain, truth = odl_compare("triton", inputs, dout, autocast=True)
    assert got[0].dtype == (torch.float32 if residual else torch.bfloat16)
    for name, g, p, t in zip(names, got, plain, truth, strict=True):
        assert_2x_rule(g, p, t, what=name, atol=AUTOCAST_ATOL)


@pytest.mark.parametrize("name", ["crate_small", "crate_base"])
def test_model_impls_agree_on_gpu(name):
    from crate_fast import create_model
    torch.manual_seed(0)
    ref = create_model(name, num_classes=10, impl="reference").cuda()
    x = torch.randn(3, 3, 224, 224, device="cuda")
    with torch.no_grad():
        truth = ref.double()(x.double())
        ref.float()
        for impl in ("torch", "triton"):
            ref.set_impl(impl)
            assert_rel(ref(x), truth, what=impl)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out_lp = ref(x)
            ref.set_impl("reference")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                plain = ref(x)
            assert_2x_rule(out_lp, plain, truth, what=f"{impl} bf16")


def test_every_admitted_config_is_correct():
    """Autotuning may pick any admitted config: each one must compute the right thing (N = 197 tail)."""
    from crate_fast.kernels import gemm, mssa
    from crate_fast.kernels._triton import force_config
    n_cfg = max(len(mssa.FWD_CONFIGS), len(mssa.BWD_CONFIGS), len(gemm.GEMM_CONFIGS))
    for i in range(n_cfg):
        with force_config(i, mssa._mssa_fwd_kernel, mssa._mssa_bwd_kernel, gemm._gemm_epilogue_kernel):
            for dtype in (torch.bfloat16, torch.float32):
                for D, causal in ((48, False), (64, False), (48, True), (64, True)):
                    w = torch.randn(3, 197, 2 * D, device="cuda").view(3, 197, 2, D).transpose(1, 2).to(dtype)
                    g = torch.randn(3, 2, 197, D, device="cuda").to(dtype)
                    ref = functools.partial(mssa_attention_ref, causal=causal)
                    got = run_grads(functools.partial(mssa_attention, causal=causal, impl="triton"), w, grad=g)
                    truth = run_grads(ref, w.double(), grad=g.double())
                    plain = run_grads(ref, w, grad=g)
                    for a, p, t in zip(got, plain, truth, strict=True):
                        check(a, p, t, f"mssa config {i} {dtype} D={D} causal={causal}")
                x = torch.randn(3 * 197, 200, device="cuda")
                W = torch.randn(200, 200, device="cuda") * 0.05
                gx = torch.randn_like(x)
                got = run_grads(lambda a, b: ista_step(a, b, impl="triton"), x.to(dtype), W.to(dtype),
                                grad=gx.to(dtype))
                truth = run_grads(ista_step_ref, x.double(), W.double(), grad=gx.double())
                plain = run_grads(ista_step_ref, x.to(dtype), W.to(dtype), grad=gx.to(dtype))
                for a, p, t in zip(got, plain, truth, strict=True):
                    check(a, p, t, f"ista config {i} {dtype}")


def test_every_admitted_odl_config_is_correct():
    """The GEMM's configs on ODL's five epilogues (d = 200: partial tiles in K and N; 591 rows)."""
    from crate_fast.kernels import gemm
    from crate_fast.kernels._triton import force_config
    for i in range(len(gemm.GEMM_CONFIGS)):
        with force_config(i, gemm._gemm_epilogue_kernel):
            for dtype in (torch.bfloat16, torch.float32):
                for residual in (True, False):
                    *inputs, dout = odl_inputs((3, 197), 200, dtype, "cuda", residual)
                    names, got, plain, truth = odl_compare("triton", inputs, dout)
                    for name, a, p, t in zip(names, got, plain, truth, strict=True):
                        check(a, p, t, f"odl config {i} {dtype} {name}")
