"""Kernel benchmarks: MSSA attention (full, and causal as CRATE-GPT's), the ISTA step and CRATE-alpha's ODL
block, fwd / bwd / fwd_bwd, every provider side by side.

On CUDA each provider is timed as replays of a CUDA graph of 10 calls (device time: an eager call of
these small ops can cost more host time than GPU time); bench_model.py gives the eager, end-to-end view.

TFLOP/s use the model's FLOPs for every provider: MSSA forward 4*B*H*N^2*D, causal half of it, backward
2.5x (the FlashAttention convention); ISTA forward 4*M*C^2 (the exact 2-GEMM step), backward 2x forward; ODL forward
8*M*d*m (its 4 GEMMs), backward 2x forward. A provider that does more arithmetic (the 3-matmul reference
ISTA, the ODL backward that recomputes two GEMMs to save most of the activations) therefore shows a
lower rate. ODL rows also record the bytes autograd saves for the backward (extra_info saved_bytes); the
"*_recompute" providers are odl_step(recompute=True), a fifth of the saved bytes for 2 more GEMMs.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import CUDA, DEVICE, annotate, capture_stream, run_graphed, saved_activation_bytes

from crate_fast.kernels import ista_step, mssa_attention, odl_step
from crate_fast.kernels.reference import ista_step_ref, mssa_attention_ref, odl_step_ref
from crate_fast.kernels.torch_ops import ista_step_torch, mssa_attention_torch, odl_step_torch

MODES = ["fwd", "bwd", "fwd_bwd"]


def _tuned(provider: str, op: str) -> dict:
    """The block sizes the autotuner picked for the last shape (triton provider only)."""
    if provider != "triton":
        return {}
    from crate_fast.kernels import gemm, mssa
    kernels = {"mssa": [mssa._mssa_fwd_kernel, mssa._mssa_bwd_kernel], "ista": [gemm._gemm_epilogue_kernel],
               "odl": [gemm._gemm_epilogue_kernel]}[op]
    return {f"config_{k.fn.__name__}": str(getattr(k, "best_config", None)) for k in kernels}

# ---------------------------------------------------------------------------------------------------
# MSSA. GPU: the four presets at 224 px (N = 197), batch 256. CPU: small shapes, ratios only.
# ---------------------------------------------------------------------------------------------------
if CUDA:
    MSSA_SHAPES = {"T": (256, 6, 197, 64), "S": (256, 12, 197, 48), "B": (256, 12, 197, 64),
                   "L": (256, 16, 197, 64)}
    MSSA_DTYPES = [torch.bfloat16]
else:
    MSSA_SHAPES = {"T32px": (32, 6, 65, 64), "S32px": (16, 12, 65, 48)}
    MSSA_DTYPES = [torch.float32, torch.bfloat16]


def _sdpa(backend, causal=False):
    from torch.nn.attention import sdpa_kernel

    def f(w, scale):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(w, w, w, scale=scale, is_causal=causal)
    return f


def mssa_providers(causal=False):
    p = {"reference": lambda w, s: mssa_attention_ref(w, s, causal=causal),
         "torch": lambda w, s: mssa_attention_torch(w, s, causal)}
    from torch.nn.attention import SDPBackend
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                SDPBackend.MATH] if CUDA else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    for b in backends:
        p[f"sdpa_{b.name.lower().replace('_attention', '')}"] = _sdpa(b, causal)
    try:
        import xformers.ops as xops
        bias = xops.LowerTriangularMask() if causal else None

        def xf(w, scale):
            t = w.transpose(1, 2)                               # xformers wants (B, N, H, D)
            return xops.memory_efficient_attention(t, t, t, attn_bias=bias, scale=scale).transpose(1, 2)
        if CUDA:
            p["xformers"] = xf
    except ImportError:
        pass
    if CUDA:
        p["triton"] = lambda w, s: mssa_attention(w, s, causal=causal, impl="triton")
    return p


MSSA_PROVIDERS = mssa_providers()


def _bench_mode(benchmark, f, inputs, mode, grad_out):
    """Time fwd (no grad), bwd (autograd.grad with a retained graph) or fwd_bwd of f(*inputs)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                f(*inputs)
    elif mode == "bwd":
        with capture_stream():                # the backward ops then run (and are captured) there
            out = f(*inputs)
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

        def step():
            torch.autograd.grad(out, leaves, grad_out, retain_graph=True)
    else:
        leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

        def step():
            torch.autograd.grad(f(*inputs), leaves, grad_out)
    return run_graphed(benchmark, step)


def _bench_attention(benchmark, f, provider, mode, dtype, shape, causal):
    B, H, N, D = shape
    # The model's layout: a strided (B, H, N, D) view of the (B, N, H*D) projection output.
    w = torch.randn(B, N, H * D, device=DEVICE, dtype=dtype).view(B, N, H, D).transpose(1, 2)
    w = (w * 0.5).detach().requires_grad_()
    scale = D ** -0.5
    try:
        out = f(w, scale)
    except (RuntimeError, NotImplementedError) as e:   # an SDPA backend that does not take this input
        pytest.skip(f"{provider}: {str(e).splitlines()[0][:120]}")
    g = torch.randn_like(out)
    seconds = _bench_mode(benchmark, f, (w, scale), mode, g)
    fwd = 4 * B * H * N * N * D // (2 if causal else 1)
    annotate(benchmark, seconds, flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd_bwd": 3.5 * fwd}[mode],
             provider=provider, shape=[B, H, N, D], dtype=str(dtype).split(".")[1], causal=causal,
             **_tuned(provider, "mssa"))


@pytest.mark.parametrize("shape", list(MSSA_SHAPES), ids=lambda s: f"{s}")
@pytest.mark.parametrize("dtype", MSSA_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("provider", list(MSSA_PROVIDERS))
@pytest.mark.parametrize("mode", MODES)
def test_mssa(benchmark, mode, provider, dtype, shape):
    benchmark.group = f"mssa-{mode}-{shape}-{str(dtype).split('.')[1]}"
    _bench_attention(benchmark, MSSA_PROVIDERS[provider], provider, mode, dtype, MSSA_SHAPES[shape], False)


# ---------------------------------------------------------------------------------------------------
# Causal MSSA (CRATE-GPT: query i attends to keys j <= i), against SDPA with is_causal=True and
# q = k = v. GPU: the 12-layer model's heads at its context T = 1024 (12 x 64), and head dim 48.
# CPU: small shapes, ratios only.
# ---------------------------------------------------------------------------------------------------
if CUDA:
    CAUSAL_SHAPES = {"T1024xB16": (16, 12, 1024, 64), "T1024xB16d48": (16, 16, 1024, 48)}
else:
    CAUSAL_SHAPES = {"T256": (2, 4, 256, 64), "T128d48": (4, 4, 128, 48)}
CAUSAL_PROVIDERS = mssa_providers(causal=True)


@pytest.mark.parametrize("shape", list(CAUSAL_SHAPES), ids=lambda s: f"{s}")
@pytest.mark.parametrize("dtype", MSSA_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("provider", list(CAUSAL_PROVIDERS))
@pytest.mark.parametrize("mode", MODES)
def test_mssa_causal(benchmark, mode, provider, dtype, shape):
    benchmark.group = f"mssa_causal-{mode}-{shape}-{str(dtype).split('.')[1]}"
    _bench_attention(benchmark, CAUSAL_PROVIDERS[provider], provider, mode, dtype, CAUSAL_SHAPES[shape], True)


# ---------------------------------------------------------------------------------------------------
# ISTA. GPU: rows = B * 197 for B in {64, 256} at the preset widths. CPU: small, ratios only. Each also
# has one image (rows < C: the torch path's direct two-GEMM form; torch_ops.ista_uses_operator_form).
# ---------------------------------------------------------------------------------------------------
if CUDA:
    ISTA_SHAPES = {f"B{b}xC{c}": (b * 197, c) for b, c in
                   [(256, 384), (256, 576), (256, 768), (256, 1024), (64, 768), (1, 768)]}
    ISTA_DTYPES = [torch.bfloat16]
else:
    ISTA_SHAPES = {"B32xC384": (32 * 65, 384), "B8xC768": (8 * 65, 768), "B1xC384": (65, 384)}
    ISTA_DTYPES = [torch.float32, torch.bfloat16]

_COMPILED = {}
# The "bwd" mode replays one backward on a retained graph, which compiled backwards with donated
# buffers refuse; donation saves memory, not time.
import torch._functorch.config  # noqa: E402

torch._functorch.config.donated_buffer = False


def _compiled_ref(x, W):
    if "ref" not in _COMPILED:
        _COMPILED["ref"] = torch.compile(ista_step_ref)
    return _COMPILED["ref"](x, W)


ISTA_PROVIDERS = {"reference": ista_step_ref, "torch": ista_step_torch, "compile": _compiled_ref}
if CUDA:
    ISTA_PROVIDERS["triton"] = lambda x, W: ista_step(x, W, impl="triton")


@pytest.mark.parametrize("shape", list(ISTA_SHAPES))
@pytest.mark.parametrize("dtype", ISTA_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("provider", list(ISTA_PROVIDERS))
@pytest.mark.parametrize("mode", MODES)
def test_ista(benchmark, mode, provider, dtype, shape):
    benchmark.group = f"ista-{mode}-{shape}-{str(dtype).split('.')[1]}"
    M, C = ISTA_SHAPES[shape]
    x = torch.randn(M, C, device=DEVICE, dtype=dtype).requires_grad_()
    W = (torch.empty(C, C, device=DEVICE).uniform_(-1, 1) * (6 / C) ** 0.5).to(dtype).requires_grad_()
    f = ISTA_PROVIDERS[provider]
    g = torch.randn(M, C, device=DEVICE, dtype=dtype)
    seconds = _bench_mode(benchmark, f, (x, W), mode, g)
    fwd = 4 * M * C * C
    annotate(benchmark, seconds, flops={"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[mode],
             provider=provider, shape=[M, C], dtype=str(dtype).split(".")[1], **_tuned(provider, "ista"))


# ---------------------------------------------------------------------------------------------------
# ODL, the whole block with its skip connection (residual + odl(x)). GPU: CRATE-alpha-B/16 at 224 px
# (d = 768, m = 3072), rows = B * 197 for B in {256, 64}, and one image. CPU: reduced widths and rows,
# ratios only.
# ---------------------------------------------------------------------------------------------------
if CUDA:
    ODL_SHAPES = {f"B{b}xd{d}": (b * 197, d) for b, d in [(256, 768), (64, 768), (1, 768)]}
    ODL_DTYPES = [torch.bfloat16]
else:
    ODL_SHAPES = {"B8xd192": (8 * 65, 192), "B2xd384": (2 * 65, 384)}
    ODL_DTYPES = [torch.float32, torch.bfloat16]


def _odl_ref(x, D, D1, z):
    return z + odl_step_ref(x, D, D1)


def _compiled_odl_ref(x, D, D1, z):
    if "odl" not in _COMPILED:
        _COMPILED["odl"] = torch.compile(_odl_ref)
    return _COMPILED["odl"](x, D, D1, z)


ODL_PROVIDERS = {"reference": _odl_ref, "torch": lambda x, D, D1, z: odl_step_torch(x, D, D1, residual=z),
                 "torch_recompute": lambda x, D, D1, z: odl_step_torch(x, D, D1, residual=z, recompute=True),
                 "compile": _compiled_odl_ref}
if CUDA:
    ODL_PROVIDERS["triton"] = lambda x, D, D1, z: odl_step(x, D, D1, residual=z, impl="triton")
    ODL_PROVIDERS["triton_recompute"] = lambda x, D, D1, z: odl_step(x, D, D1, residual=z, recompute=True,
                                                                      impl="triton")


@pytest.mark.parametrize("shape", list(ODL_SHAPES))
@pytest.mark.parametrize("dtype", ODL_DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("provider", list(ODL_PROVIDERS))
@pytest.mark.parametrize("mode", MODES)
def test_odl(benchmark, mode, provider, dtype, shape):
    benchmark.group = f"odl-{mode}-{shape}-{str(dtype).split('.')[1]}"
    M, d = ODL_SHAPES[shape]
    m = 4 * d
    x = torch.randn(M, d, device=DEVICE, dtype=dtype).requires_grad_()
    z = torch.randn(M, d, device=DEVICE, dtype=dtype).requires_grad_()
    D, D1 = ((torch.empty(d, m, device=DEVICE).uniform_(-1, 1) * (6 / m) ** 0.5).to(dtype).requires_grad_()
             for _ in range(2))
    f = ODL_PROVIDERS[provider]
    g = torch.randn(M, d, device=DEVICE, dtype=dtype)
    seconds = _bench_mode(benchmark, f, (x, D, D1, z), mode, g)
    fwd = 8 * M * d * m
    saved = saved_activation_bytes(lambda: f(x, D, D1, z), params=(D, D1)) if mode == "fwd_bwd" else None
    annotate(benchmark, seconds, flops={"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[mode],
             provider=provider, shape=[M, d, m], dtype=str(dtype).split(".")[1], saved_bytes=saved,
             **_tuned(provider, "odl"))
