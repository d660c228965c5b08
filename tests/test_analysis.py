"""White-box analysis: coding rate, sparsity, attention maps, the analyze CLI."""
import json
import os

import pytest
import torch
from conftest import KERNEL_DEVICE
from tolerances import MAPS_ATOL, MAPS_RTOL, STATS_ATOL, STATS_RTOL

from crate_fast import create_model
from crate_fast.analysis import (
    attention_maps,
    coding_rate,
    expansion_rate,
    layer_stats,
    patch_features,
    pca_rgb,
    threshold_masks,
    zero_fraction,
)


def small_model(**kw):
    torch.manual_seed(0)
    return create_model("crate_tiny", num_classes=5, img_size=32, patch_size=8, depth=3, dim=96, heads=2, **kw)


def coding_rate_f64(w, eps=0.01):
    """Independent float64 version of the official formula: the n x n Gram matrix and torch.logdet."""
    w = w.double()
    y = w / w.norm(dim=-1, keepdim=True)
    n, p = y.shape[-2:]
    eye = torch.eye(n, dtype=torch.float64)
    return 0.5 * torch.logdet(eye + p / (n * eps) * y @ y.transpose(-1, -2)).sum(-1)


def test_coding_rate_matches_float64_formula():
    w = torch.randn(3, 4, 17, 16)
    torch.testing.assert_close(coding_rate(w).double(), coding_rate_f64(w), rtol=STATS_RTOL, atol=STATS_ATOL)
    # More tokens than dimensions and the other way round take different (Sylvester) branches.
    w = torch.randn(2, 2, 5, 40)
    torch.testing.assert_close(coding_rate(w).double(), coding_rate_f64(w), rtol=STATS_RTOL, atol=STATS_ATOL)


def test_expansion_rate_matches_float64_formula():
    z = torch.randn(2, 9, 24)
    y = (z / z.norm(dim=-1, keepdim=True)).double()
    want = 0.5 * torch.logdet(torch.eye(9, dtype=torch.float64) + 24 / (9 * 0.01) * y @ y.transpose(-1, -2))
    torch.testing.assert_close(expansion_rate(z).double(), want, rtol=STATS_RTOL, atol=STATS_ATOL)


def test_coding_rate_of_identical_tokens_is_minimal():
    same = torch.randn(1, 1, 1, 8).expand(1, 1, 10, 8)
    spread = torch.randn(1, 1, 10, 8)
    assert coding_rate(same) < coding_rate(spread)


def test_zero_fraction_on_constructed_inputs():
    x = torch.ones(2, 4, 5)
    x[0, :2] = 0                      # 10 of 20 entries
    x[1, 0, 0] = 0                    # 1 of 20
    torch.testing.assert_close(zero_fraction(x), torch.tensor([0.5, 0.05]))


def test_layer_stats_shape_values_and_no_leftovers():
    model = small_model()
    x = torch.randn(4, 3, 32, 32)
    a = layer_stats(model, x)
    assert len(a) == 3
    for row in a:
        assert {"coding_rate", "coding_rate_std", "sparsity", "sparsity_std", "l0", "expansion_rate"} <= set(row)
        assert 0 <= row["sparsity"] <= 1 and row["l0"] == pytest.approx(1 - row["sparsity"])
        assert row["coding_rate"] > 0 and row["coding_rate_std"] >= 0
    assert layer_stats(model, x) == a, "repeat calls must not depend on state left by earlier ones"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert model.training, "the model's mode is restored"
    # Sparsity equals the zero fraction of the model's own ISTA outputs.
    with torch.no_grad():
        model.eval()
        z = model.embed(x)
        for blk, row in zip(model.blocks, a, strict=True):
            z = blk(z)
            assert row["sparsity"] == pytest.approx(zero_fraction(z).mean().item())
    # A bf16 model is analyzed in fp32.
    assert layer_stats(small_model().bfloat16(), x)[0]["coding_rate"] == pytest.approx(a[0]["coding_rate"], rel=2e-2)


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_attention_maps_equal_the_models_own_attention(impl):
    model = small_model(impl="reference").to(KERNEL_DEVICE if impl == "triton" else "cpu")
    x = torch.randn(2, 3, 40, 48)                                   # not the config size: interpolated
    dev = next(model.parameters()).device
    with torch.no_grad():
        z = model.embed(x.to(dev))
        for blk in model.blocks[:2]:
            z = blk(z)
        w = model.blocks[2].attn.project(model.blocks[2].norm1(z)).double()
        probs = torch.softmax(w @ w.transpose(-1, -2) * model.blocks[2].attn.scale, dim=-1)
    want = probs[:, :, 0, 1:].reshape(2, 2, 5, 6).float().cpu()
    model.set_impl(impl)
    got = attention_maps(model, x, layer=-1).cpu()
    assert got.shape == (2, 2, 5, 6)
    torch.testing.assert_close(got, want, rtol=MAPS_RTOL, atol=MAPS_ATOL)


def test_threshold_masks_keep_the_requested_mass():
    maps = torch.softmax(torch.randn(3, 2, 6, 6).flatten(-2), -1).view(3, 2, 6, 6)
    masks = threshold_masks(maps, tau=0.6)
    kept = (maps * masks).flatten(-2).sum(-1)
    assert (kept >= 0.6 - 1e-6).all()
    # Minimal: dropping the smallest kept patch falls below tau.
    smallest = torch.where(masks, maps, torch.inf).flatten(-2).min(-1).values
    assert (kept - smallest < 0.6).all()
    with pytest.raises(ValueError):
        threshold_masks(maps, tau=0)


def test_pca_rgb_range():
    rgb = pca_rgb(patch_features(small_model(), torch.randn(2, 3, 32, 32)))
    assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1


def _check_outputs(out, n_images, n_layers=12):
    from PIL import Image
    files = set(os.listdir(out))
    expected = {"stats.json", "coding_rate.png", "sparsity.png", "pca.png"}
    expected |= {f"attention_{i}.png" for i in range(n_images)} | {f"masks_{i}.png" for i in range(n_images)}
    assert expected <= files
    for f in expected - {"stats.json"}:
        with Image.open(os.path.join(out, f)) as im:
            im.verify()
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["num_images"] == n_images and len(stats["layers"]) == n_layers


def test_cli_with_a_train_checkpoint_and_image_files(tmp_path):
    from PIL import Image

    from crate_fast.analyze import main
    model = create_model("crate_tiny", num_classes=5, img_size=32, patch_size=8)
    ckpt = tmp_path / "best.pt"              # what train.py writes: weights plus the resolved config
    torch.save({"model": model.state_dict(), "config": {"arch": "crate_tiny", "img_size": 32, "patch_size": 8}}, ckpt)
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--images", *paths]) == 0
    _check_outputs(out, 2)


def test_cli_with_an_official_checkpoint(tmp_path):
    from official_crate import OfficialCRATE

    from crate_fast.analyze import main
    torch.manual_seed(0)
    off = OfficialCRATE(image_size=32, patch_size=8, num_classes=7, dim=384, depth=12, heads=6, dim_head=64)
    path = tmp_path / "official.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in off.state_dict().items()}}, path)
    out = tmp_path / "out"
    assert main(["--ckpt", str(path), "--arch", "crate_tiny", "--img-size", "32", "--patch-size", "8",
                 "--out", str(out), "--images", "digits"]) == 0
    _check_outputs(out, 6)


def test_cli_errors(tmp_path, capsys):
    from crate_fast.analyze import main
    assert main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "official.pth"
    torch.save({"state_dict": {}}, bad)
    assert main(["--ckpt", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "--arch" in capsys.readouterr().err


def test_attention_overlay_shares_the_pictures_pixel_grid():
    """docs/analysis/attention_0.png had a grey strip along the right and bottom of every head's map:
    the map was drawn on extent (0, W, H, 0), the picture on matplotlib's default, half a pixel off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from crate_fast.analyze import overlay
    fig, ax = plt.subplots()
    overlay(ax, np.zeros((32, 48, 3), np.uint8), np.random.default_rng(0).random((4, 6)))
    picture, heat = ax.get_images()
    assert tuple(picture.get_extent()) == tuple(heat.get_extent()) == (0, 48, 32, 0)
    plt.close(fig)
