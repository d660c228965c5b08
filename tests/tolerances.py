"""The one tolerance table of the test suite (DESIGN §5).

Truth is float64. fp32 paths: relative error (max |err| / max |truth|) <= 1e-5. Low-precision,
matmul-bearing paths follow the FlashAttention rule: the fused error may be at most twice the error of
plain PyTorch autograd in the same dtype, plus a small absolute slack.
"""
import torch

FP32_RTOL = 1e-5          # fp32 outputs vs float64 truth
FP64_RTOL = 1e-10         # float64 reformulations vs float64 reference (differ only in rounding order)
LOWP_FACTOR = 2.0         # the 2x rule
LOWP_ATOL = {torch.bfloat16: 5e-3, torch.float16: 1e-3, torch.float32: 1e-6}  # x max|truth|


def max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    assert x.shape == truth.shape, (x.shape, truth.shape)
    assert torch.isfinite(x).all(), "non-finite values (unwritten or poisoned output?)"
    return (x.double() - truth.double()).abs().max().item()


def rel_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return max_err(x, truth) / max(truth.double().abs().max().item(), 1e-30)


def assert_rel(x: torch.Tensor, truth: torch.Tensor, rtol: float = FP32_RTOL, what: str = "") -> None:
    err = rel_err(x, truth)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"


def assert_2x_rule(x: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, what: str = "",
                   atol: float | None = None) -> None:
    """err(x) <= 2 * err(plain PyTorch, same dtype) + atol, both against the float64 truth."""
    atol = LOWP_ATOL.get(x.dtype, 1e-6) if atol is None else atol
    scale = max(truth.double().abs().max().item(), 1.0)
    e_x, e_plain = max_err(x, truth), max_err(plain, truth)
    bound = LOWP_FACTOR * e_plain + atol * scale
    assert e_x <= bound, f"{what}: error {e_x:.3e} > 2 x plain {e_plain:.3e} + atol ({bound:.3e})"
