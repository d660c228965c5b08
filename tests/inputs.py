"""Inputs shared by the kernel tests (test_mssa, test_ista, test_odl, test_triton_ops, test_gpu_shapes), so
that no test module imports another: where each impl runs, ISTA's and ODL's well-posed inputs and the
ODL comparison, and non-finite poisons. The comparisons themselves live in harness.py, the tolerance
literals in tolerances.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from conftest import KERNEL_DEVICE
from harness import run_grads

from crate_fast.kernels import mssa_attention, odl_step, odl_step_ref


def device_for(impl: str) -> str:
    """Where an impl's test tensors live: the kernel device for "triton", else the CPU."""
    return KERNEL_DEVICE if impl == "triton" else "cpu"


def attention(w, impl: str, **kwargs):
    """mssa_attention under a test's impl name, where "X_recompute" is impl="X" with recompute=True (the
    probabilities recomputed from the saved log-sum-exp in the backward)."""
    return mssa_attention(w, impl=impl.removesuffix("_recompute"), recompute=impl.endswith("_recompute"), **kwargs)


# ------------------------------------------------------------------------------------------------
# ISTA
# ------------------------------------------------------------------------------------------------
def ista_inputs(lead, C, dtype, device, margin=0.25, step_size=0.1, lambd=0.1):
    """Random W and x whose pre-activations z = x + eta (x W - x W^T W) - eta lambda are random, of
    both signs, and at least ``margin`` away from zero, so rounding cannot flip a ReLU (whose gradient
    would jump) and every dtype's gradients are comparable with the float64 truth.

    In row form z = x A - eta lambda with A = I + eta (W - W^T W), so x = (z + eta lambda) A^-1.
    """
    W = torch.empty(C, C, dtype=torch.float64).uniform_(-1, 1) * (6 / C) ** 0.5   # official init scale
    z = torch.randn(*lead, C, dtype=torch.float64)
    z = torch.sign(z) * (margin + z.abs())
    A = torch.eye(C, dtype=torch.float64) + step_size * (W - W.t() @ W)
    x = torch.linalg.solve(A, (z + step_size * lambd).reshape(-1, C), left=False).reshape(z.shape)
    return x.to(device, dtype), W.to(device, dtype)


# ------------------------------------------------------------------------------------------------
# ODL
# ------------------------------------------------------------------------------------------------
ODL_NAMES = ("out", "dx", "dD", "dD1", "dresidual")


def odl_reference(x, D, D1, residual=None, step_size=0.1, lambd=0.1):
    """The port's block with its skip connection: residual + odl_step_ref(x, D, D1)."""
    out = odl_step_ref(x, D, D1, step_size, lambd)
    return out if residual is None else residual + out


def odl_preactivations(x, D, step_size=0.1, lambd=0.1):
    """The two ReLUs' inputs in float64, rows (M, m): eta x D - eta lambda, a1 - eta (a1 D^T - x) D - eta lambda."""
    x, D = x.reshape(-1, D.shape[0]).double().cpu(), D.double().cpu()
    z1 = step_size * x @ D - step_size * lambd
    a1 = z1.relu()
    return z1, a1 - step_size * (a1 @ D.t() - x) @ D - step_size * lambd


def odl_inputs(lead, d, dtype, device, residual=True, margin=0.03, step_size=0.1, lambd=0.1):
    """Random (x, D, D1, residual or None, dout) whose two ReLU pre-activations are all at least
    ``margin`` / 2 from zero (typical size 0.3), with both signs, in float64 after rounding to ``dtype``:
    rounding cannot then flip a ReLU (whose gradient would jump), so every dtype's gradients are
    comparable with the float64 truth.

    Random inputs cannot do that (a few hundred of the M x 2m pre-activations land within bf16
    rounding of zero), so the sparse code is built first. Each atom (column of D) is a scaled copy of
    one of d orthonormal directions, 4 atoms per direction, two of each sign, |scale| in [1.5, 4] (so
    eta s^2 ~ 1 and the second step turns atoms on and off). In the rotated frame y = x U the two steps
    then decouple into one scalar y per (row, direction) and its 4 atoms: y is redrawn until all 8 of its
    pre-activations clear ``margin`` (and a direction's scales, if that keeps failing). A small dense
    perturbation of x and D then makes them generic.
    """
    M, m = math.prod(lead), 4 * d
    f64 = dict(dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(d, d, **f64)).Q
    atom = torch.randperm(m)
    k, sign = atom % d, torch.tensor([1.0, 1.0, -1.0, -1.0], **f64)[atom // d]   # direction, sign per atom
    mag = torch.empty(m, **f64).uniform_(1.5, 4.0)
    y = torch.randn(M, d, **f64)
    for step in range(1000):
        s = sign * mag
        z1 = step_size * (y[:, k] * s - lambd)
        a1 = z1.relu()
        coef = torch.zeros(M, d, **f64).index_add_(1, k, a1 * s)               # a1 S^T: per direction
        z2 = a1 + z1 - step_size * s * coef[:, k]                               # == odl_preactivations() here
        near = ((z1.abs() < margin) | (z2.abs() < margin)).double()
        bad = torch.zeros(M, d, **f64).index_add_(1, k, near) > 0               # per (row, direction)
        if not bad.any():
            break
        y[bad] = torch.randn(int(bad.sum()), **f64)
        if step % 20 == 19:                      # some scales admit no y: new ones for those directions
            redo = bad.any(0)[k]
            mag[redo] = torch.empty(int(redo.sum()), **f64).uniform_(1.5, 4.0)
    S = torch.zeros(d, m, **f64)
    S[k, torch.arange(m)] = s
    x, D = y @ U.t(), U @ S
    for _ in range(10):
        xp = (x + 0.005 * torch.randn(M, d, **f64)).to(dtype)
        Dp = (D + 0.005 * torch.randn(d, m, **f64) * mag.mean() / d ** 0.5).to(dtype)
        z1, z2 = odl_preactivations(xp, Dp, step_size, lambd)
        if min(z1.abs().min(), z2.abs().min()) >= margin / 2:
            break
    else:
        raise AssertionError("no well-posed ODL input found")
    for z in (z1, z2):
        assert 0.1 < (z > 0).double().mean() < 0.9, "both ReLU branches should be exercised"
    D1 = torch.randn(d, m, **f64) * d ** -0.5
    res = 0.3 * torch.randn(*lead, d, **f64) if residual else None
    out = [xp.reshape(*lead, d), Dp, D1.to(dtype), res, torch.randn(*lead, d, **f64)]
    return [None if t is None else t.to(device, dtype) for t in out]


def odl_compare(impl, inputs, dout, autocast=False, recompute=False):
    """(names, got, plain, truth): output and gradients of odl_step(impl, recompute), of the port in the
    inputs' dtype (under the same autocast), and of the port in float64, all on the inputs' device; the
    residual's gradient when it is given."""
    inputs = [t for t in inputs if t is not None]

    def fast(x, D, D1, *r):
        return odl_step(x, D, D1, residual=r[0] if r else None, recompute=recompute, impl=impl)

    def run(fn, ins, g):
        if not autocast:
            return run_grads(fn, *ins, grad=g)
        with torch.autocast(ins[0].device.type, dtype=torch.bfloat16):
            return run_grads(fn, *ins, grad=g)

    got = run(fast, inputs, dout)
    plain = run(odl_reference, inputs, dout)
    truth = run_grads(odl_reference, *(t.double() for t in inputs), grad=dout.double())
    return ODL_NAMES[:len(got)], got, plain, truth


# ------------------------------------------------------------------------------------------------
# Non-finite inputs. Each kernel puts NaN and +-Inf exactly where its reference twin does, in the output
# and in every gradient: a NaN or Inf is never turned into a finite value, nor a finite value into one.
# ------------------------------------------------------------------------------------------------
NONFINITE = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
# The interpreter computes with numpy, which warns about the very NaN arithmetic these tests exercise.
numpy_nan_warnings = pytest.mark.filterwarnings("ignore:(invalid value|All-NaN):RuntimeWarning")


def poisoned(t: torch.Tensor, index: tuple, poison: str) -> torch.Tensor:
    """A copy of t with t[index] (one row) set to NaN/+-Inf, or only its element 1 for a bare kind."""
    t = t.clone()
    kind, _, whole = poison.partition("_")
    t[index if whole else (*index, 1)] = NONFINITE[kind]
    return t


def assert_same_nonfinite(names, got, ref) -> None:
    """NaN, +Inf and -Inf at exactly the positions where the reference has them."""
    for name, g, r in zip(names, got, ref, strict=True):
        for mask in (torch.isnan, torch.isposinf, torch.isneginf):
            a, b = mask(g.cpu()), mask(r.cpu())
            assert torch.equal(a, b), f"{name}: {mask.__name__} at {int(a.sum())} positions, reference {int(b.sum())}"
