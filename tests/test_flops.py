"""FLOP counts against the formulas and per-preset numbers of docs/DESIGN.md §6."""
import pytest

from crate_fast import get_config
from crate_fast.flops import flops_per_image, peak_flops, vit_flops_per_image

# (forward GFLOP with the 2-matmul ISTA, with the official 3-matmul ISTA, training GFLOP/img)
ANCHORS = {"crate_tiny": (3.62, 4.32, 10.9), "crate_small": (7.52, 9.09, 22.6),
           "crate_base": (12.82, 15.61, 38.5), "crate_large": (43.79, 53.70, 131.4)}


@pytest.mark.parametrize("name", sorted(ANCHORS))
def test_crate_flops_match_perf_anchors(name):
    cfg = get_config(name)
    fwd2, fwd3, train = ANCHORS[name]
    assert round(flops_per_image(cfg) / 1e9, 2) == fwd2
    assert round(flops_per_image(cfg, ista="3mm") / 1e9, 2) == fwd3
    assert round(flops_per_image(cfg, training=True) / 1e9, 1) == train


def test_crate_flops_formula_small_config():
    cfg = get_config("crate_tiny", img_size=32, patch_size=4, depth=2, dim=64, heads=2, num_classes=10)
    P, N, d = 64, 65, 64
    expected = 2 * P * 48 * d + 2 * (8 * N * d * d + 4 * N * N * d) + 2 * d * 10
    assert flops_per_image(cfg) == expected
    # A different input size changes the token count.
    assert flops_per_image(cfg, img_size=(16, 16)) < expected


def test_vit_base_check_value_and_peaks():
    assert round(vit_flops_per_image(768, 12) / 1e9, 2) == 35.13      # = 17.56 GMAC; timm lists 17.58
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12 and peak_flops("some cpu") is None
    with pytest.raises(ValueError):
        flops_per_image(get_config("crate_tiny"), ista="1mm")


@pytest.mark.parametrize("name,patch,gflop", [
    ("crate_alpha_base", 32, 13.1), ("crate_alpha_base", 16, 51.9), ("crate_alpha_base", 8, 223.0),
    ("crate_alpha_large", 14, 239.6), ("crate_alpha_large", 8, 772.1)])
def test_crate_alpha_flops(name, patch, gflop):
    """Forward GFLOP per 224 px image of the published CRATE-alpha shapes (ODL = 8 N d m per layer)."""
    assert round(flops_per_image(get_config(name, patch_size=patch)) / 1e9, 1) == gflop
    cfg = get_config(name, patch_size=patch, overcomplete_ratio=1)
    assert flops_per_image(cfg) < flops_per_image(get_config(name, patch_size=patch))
