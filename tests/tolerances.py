"""The one tolerance table of the test suite (docs/DESIGN.md §5). Literals only: the helpers that apply
them live in harness.py.

Truth is float64. fp32 paths: relative error (max |err| / max |truth|) <= 1e-5. Low-precision,
matmul-bearing paths follow the FlashAttention rule: the fused error may be at most twice the error of
plain PyTorch autograd in the same dtype, plus a small absolute slack.
"""
import torch

FP32_RTOL = 1e-5          # fp32 outputs vs float64 truth
FP64_RTOL = 1e-10         # float64 reformulations vs float64 reference (differ only in rounding order)
LOWP_FACTOR = 2.0         # the 2x rule
LOWP_ATOL = {torch.bfloat16: 5e-3, torch.float16: 1e-3, torch.float32: 1e-6}  # x max|truth|
AUTOCAST_ATOL = 1e-3      # 2x-rule slack (x max|truth|) for bf16 autocast around an fp32 residual stream
BF16_HEAD_DIM_128_ATOL = 0.05   # absolute error of a bf16 attention at head dim 128 (unit-variance input)

# Statistics (coding rate, expansion rate) in fp32 against an independent float64 formula.
STATS_RTOL, STATS_ATOL = 1e-5, 1e-4
# Attention maps on a resized input: fp32 interpolation + softmax against a float64 twin.
MAPS_RTOL, MAPS_ATOL = 1e-4, 1e-5
# Lion vs lion-pytorch: the same fp32 update, differently fused.
LION_ATOL = 1e-6
# uint8 -> normalized pixels: fp32 is a few ulp; bf16 at most half a bf16 ulp (2^-8 relative) on top.
NORMALIZE_TOL = {torch.float32: 1e-6, torch.bfloat16: 2 ** -8}
