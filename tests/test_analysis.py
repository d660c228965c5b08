"""White-box analysis: coding rate, sparsity, attention maps, position tables, the notebooks' PCA, the CLI;
for every family (CRATE, CRATE-alpha, CRATE-MAE's encoder) and CRATE-MAE's reconstructions."""
import argparse
import copy
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import KERNEL_DEVICE
from harness import assert_rel
from tolerances import FP32_RTOL, FP64_RTOL, MAPS_ATOL, MAPS_RTOL, STATS_ATOL, STATS_RTOL

from crate_fast import create_model, to_official_state_dict
from crate_fast.analysis import (
    attention_maps,
    coding_rate,
    embed_tokens,
    expansion_rate,
    foreground_mask,
    layer_stats,
    mae_reconstruction,
    patch_features,
    pca_rgb,
    sparse_code_name,
    threshold_masks,
    zero_fraction,
)
from crate_fast.layers import resample_pos_embed
from crate_fast.registry import family_of


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


def own_attention(model, x, layer, pos_interp):
    """The CLS rows of block `layer`'s attention, from the model's own modules, in float64."""
    with torch.no_grad():
        z = model.embed(x, pos_interp=pos_interp)
        for blk in model.blocks[:layer]:
            z = blk(z)
        w = model.blocks[layer].attn.project(model.blocks[layer].norm1(z)).double()
        probs = torch.softmax(w @ w.transpose(-1, -2) * model.blocks[layer].attn.scale, dim=-1)
    return probs[:, :, 0, 1:]


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_attention_maps_equal_the_models_own_attention(impl):
    model = small_model(impl="reference").to(KERNEL_DEVICE if impl == "triton" else "cpu")
    x = torch.randn(2, 3, 40, 48)                                   # not the config size: interpolated
    dev = next(model.parameters()).device
    want = own_attention(model, x.to(dev), 2, "dino").reshape(2, 2, 5, 6).float().cpu()
    model.set_impl(impl)
    got = attention_maps(model, x, layer=-1).cpu()                  # default: the notebooks' DINO positions
    assert got.shape == (2, 2, 5, 6)
    torch.testing.assert_close(got, want, rtol=MAPS_RTOL, atol=MAPS_ATOL)


def test_attention_maps_position_interpolation_choice():
    """pos_interp="size" reproduces the model's forward; "dino" differs off the training grid, not on it."""
    model = small_model()
    x = torch.randn(2, 3, 40, 48)
    size = attention_maps(model, x, layer=1, pos_interp="size")
    torch.testing.assert_close(size, own_attention(model, x, 1, "size").reshape(2, 2, 5, 6).float(),
                               rtol=MAPS_RTOL, atol=MAPS_ATOL)
    assert (size - attention_maps(model, x, layer=1, pos_interp="dino")).abs().max() > 1e-3
    native = torch.randn(2, 3, 32, 32)
    assert torch.equal(attention_maps(model, native, pos_interp="size"), attention_maps(model, native))
    with pytest.raises(ValueError, match="pos_interp must be 'dino' or 'size'"):
        attention_maps(model, x, pos_interp="bilinear")
    with pytest.raises(ValueError, match="pos_interp must be 'dino' or 'size'"):
        layer_stats(model, x, pos_interp="zoom")          # a resize method of checkpoints, not of the analysis


def test_attention_maps_select_layer_and_heads():
    model = small_model()                                           # 3 layers, 2 heads
    x = torch.randn(2, 3, 32, 32)
    every = attention_maps(model, x, layer=1)
    assert torch.equal(attention_maps(model, x, layer=1, heads=[1, 0]), every[:, [1, 0]])
    assert torch.equal(attention_maps(model, x, layer=1, heads=[-1]), every[:, [1]])
    assert torch.equal(attention_maps(model, x, layer=-2), every)
    assert not torch.equal(attention_maps(model, x, layer=0), every)
    for layer in (3, -4):
        with pytest.raises(ValueError, match=r"layer .* out of range: the model has 3 layers"):
            attention_maps(model, x, layer=layer)
    with pytest.raises(TypeError, match="layer must be an int"):
        attention_maps(model, x, layer=1.0)
    with pytest.raises(ValueError, match=r"head\(s\) \[2\] out of range: the model has 2 heads"):
        attention_maps(model, x, heads=[0, 2])
    with pytest.raises(ValueError, match="more than once"):
        attention_maps(model, x, heads=[1, -1])
    with pytest.raises(ValueError, match="empty"):
        attention_maps(model, x, heads=[])
    with pytest.raises(TypeError, match="heads must be ints"):
        attention_maps(model, x, heads=[0.5])
    with pytest.raises(ValueError, match="out of range"):
        patch_features(model, x, layer=5)


# -- every family: CRATE-alpha (ODL codes) and CRATE-MAE's encoder, against float64 twins ----------

def alpha_model():
    torch.manual_seed(0)
    return create_model("crate_alpha_tiny", num_classes=5, img_size=32, patch_size=8, depth=3, dim=96, heads=2)


def mae_model(**kw):
    torch.manual_seed(0)
    model = create_model("mae_crate_tiny", dim=64, heads=2, depth=3, decoder_depth=2, img_size=32, patch_size=8, **kw)
    with torch.no_grad():            # off the init (zero biases, unit LayerNorms), so a skipped tensor shows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def float64_twin(model):
    twin = copy.deepcopy(model).double().eval()
    twin.set_impl("reference")
    return twin


def expansion_rate_f64(z, eps=0.01):
    y = z / z.norm(dim=-1, keepdim=True)
    n, d = y.shape[-2:]
    return 0.5 * torch.logdet(torch.eye(n, dtype=torch.float64) + d / (n * eps) * y @ y.transpose(-1, -2))


def odl_codes_f64(blk, x):
    """CRATE-alpha's a2 as DESIGN.md §2.2 writes it: p = eta x D, a1 = relu(p - eta lambda),
    a2 = relu(a1 + p - eta (a1 D^T) D - eta lambda)."""
    eta, lam, D = blk.odl.step_size, blk.odl.lambd, blk.odl.D.detach().double()
    p = eta * x @ D
    a1 = torch.relu(p - eta * lam)
    return torch.relu(a1 + p - eta * (a1 @ D.T) @ D - eta * lam)


def mae_tokens_f64(model, x, grid):
    """CRATE-MAE's encoder input written out in float64: conv patches, CLS, the sin-cos table (the notebook
    interpolation off its 4 x 4 grid, notebook_interpolate below)."""
    twin = float64_twin(model)
    w, b = twin.patch_embed.proj.weight, twin.patch_embed.proj.bias
    patches = F.conv2d(x.double(), w, b, stride=8).flatten(2).transpose(1, 2)
    table = twin.decoder_pos_embed.detach()
    if tuple(grid) != (4, 4):
        table = torch.from_numpy(notebook_interpolate(table.numpy(), grid))
    return torch.cat([twin.cls_token.expand(x.shape[0], -1, -1), patches], dim=1) + table, twin


def test_layer_stats_of_crate_alpha_count_the_odl_codes():
    model = alpha_model()
    x = torch.randn(3, 3, 32, 32)
    got = layer_stats(model, x)
    twin = float64_twin(model)
    with torch.no_grad():
        z = twin.embed(x.double())
        for blk, row in zip(twin.blocks, got, strict=True):
            zn = blk.norm1(z)
            rc, r = coding_rate_f64(blk.attn.project(zn)), expansion_rate_f64(zn)
            z_half = z + blk.attn(zn)
            a2 = odl_codes_f64(blk, blk.norm2(z_half))
            z = z_half + a2 @ blk.odl.D1.detach().double().T
            assert row["coding_rate"] == pytest.approx(rc.mean().item(), rel=STATS_RTOL, abs=STATS_ATOL)
            assert row["expansion_rate"] == pytest.approx(r.mean().item(), rel=STATS_RTOL, abs=STATS_ATOL)
            # fp32 vs float64 may put a pre-activation within rounding of 0 on the other side: a few entries
            assert row["sparsity"] == pytest.approx(zero_fraction(a2).mean().item(), abs=1e-3)
            assert 0 < row["sparsity"] < 1
    # Exactly the zeros of the model's own codes along its own forward; the block output (a residual sum)
    # is dense, so counting it would report no sparsity at all.
    with torch.no_grad():
        model.eval()
        z = model.embed(x, pos_interp="dino")
        for blk, row in zip(model.blocks, got, strict=True):
            z_half = z + blk.attn(blk.norm1(z))
            assert row["sparsity"] == pytest.approx(zero_fraction(blk.odl.codes(blk.norm2(z_half))).mean().item())
            z = blk(z)
            assert zero_fraction(z).max() == 0
    assert sparse_code_name(model) == "ODL codes a2" and sparse_code_name(small_model()) == "ISTA output"


def test_crate_mae_encoder_tokens_are_forward_features_input():
    """embed_tokens + encoder blocks + norm = forward_features bit for bit (on and off the grid), and at the
    config's size forward_encoder at mask ratio 0."""
    model = mae_model().eval()
    with torch.no_grad():
        for size in [(32, 32), (40, 48)]:
            x = torch.randn(2, 3, *size)
            z = embed_tokens(model, x)
            for blk in model.blocks:
                z = blk(z)
            assert torch.equal(model.norm(z), model.forward_features(x))
        x = torch.randn(2, 3, 32, 32)
        z = embed_tokens(model, x)
        for blk in model.blocks:
            z = blk(z)
        assert torch.equal(model.norm(z), model.forward_encoder(x, 0.0)[0])
        # "size" resizes the sin-cos table with F.interpolate(size=...) instead
        x = torch.randn(2, 3, 40, 48)
        assert not torch.equal(embed_tokens(model, x, "size"), embed_tokens(model, x))
    with pytest.raises(ValueError, match="pos_interp"):
        embed_tokens(model, x, "zoom")
    with pytest.raises(TypeError, match="CRATE, CRATE-alpha, CRATE-MAE and CRATE-GPT models here, got Linear"):
        embed_tokens(torch.nn.Linear(3, 3), x)


@pytest.mark.parametrize("size", [(32, 32), (40, 48)])
def test_layer_stats_and_attention_of_crate_mae_equal_float64_formulas(size):
    model = mae_model()
    x = torch.randn(2, 3, *size)
    grid = (size[0] // 8, size[1] // 8)
    stats = layer_stats(model, x)
    maps = attention_maps(model, x, layer=1, heads=[1, 0])
    feats = patch_features(model, x, layer=1)
    z, twin = mae_tokens_f64(model, x, grid)
    with torch.no_grad():
        for i, (blk, row) in enumerate(zip(twin.blocks, stats, strict=True)):
            zn = blk.norm1(z)
            w = blk.attn.project(zn)
            assert row["coding_rate"] == pytest.approx(coding_rate_f64(w).mean().item(), rel=STATS_RTOL, abs=STATS_ATOL)
            assert row["expansion_rate"] == pytest.approx(expansion_rate_f64(zn).mean().item(), rel=STATS_RTOL,
                                                          abs=STATS_ATOL)
            if i == 1:
                probs = torch.softmax(w @ w.transpose(-1, -2) * blk.attn.scale, dim=-1)
                want = probs[:, [1, 0], 0, 1:].reshape(2, 2, *grid)
                torch.testing.assert_close(maps.double(), want, rtol=MAPS_RTOL, atol=MAPS_ATOL)
                assert_rel(feats, blk.attn.qkv(zn)[:, 1:].reshape(2, *grid, -1), 1e-5, "patch features")
            z = blk(z)       # the reference ISTA in float64; its zeros: the fp32 run's up to rounding at 0
            assert row["sparsity"] == pytest.approx(zero_fraction(z).mean().item(), abs=1e-3)
            assert 0 < row["sparsity"] < 1
    assert model.training, "the model's mode is restored"
    rgb = pca_rgb(feats, foreground_mask(feats))
    assert rgb.shape == (2, *grid, 3) and 0 <= rgb.min() and rgb.max() <= 1


def test_attention_maps_of_crate_alpha_equal_float64_formula():
    model = alpha_model()
    x = torch.randn(2, 3, 40, 48)
    twin = float64_twin(model)
    with torch.no_grad():
        z = twin.embed(x.double(), pos_interp="dino")
        z = twin.blocks[0](z)
        w = twin.blocks[1].attn.project(twin.blocks[1].norm1(z))
        probs = torch.softmax(w @ w.transpose(-1, -2) * twin.blocks[1].attn.scale, dim=-1)
    torch.testing.assert_close(attention_maps(model, x, layer=1).double(), probs[:, :, 0, 1:].reshape(2, 2, 5, 6),
                               rtol=MAPS_RTOL, atol=MAPS_ATOL)
    feats = patch_features(model, x, layer=-1)
    assert feats.shape == (2, 5, 6, 96)
    rgb = pca_rgb(feats, foreground_mask(feats))
    assert rgb.shape == (2, 5, 6, 3) and 0 <= rgb.min() and rgb.max() <= 1


# -- CRATE-MAE reconstructions (FAIR's demo) --------------------------------------------------------

def unpatchify_f64(patches, p, c, gh, gw):
    """FAIR's unpatchify written with einsum: (B, L, p p c) -> (B, c, gh p, gw p)."""
    x = patches.reshape(patches.shape[0], gh, gw, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(patches.shape[0], c, gh * p, gw * p)


def test_mae_reconstruction_is_fairs_demo_with_reproducible_masks():
    model = mae_model()
    x = torch.randn(3, 3, 32, 32)
    rec = mae_reconstruction(model, x, mask_ratio=0.75, seed=5)
    assert model.training, "the model's mode is restored"
    assert set(rec) == {"original", "masked", "reconstruction", "pasted", "mask", "loss"}
    assert (rec["mask"].sum(1) == 12).all(), "int(16 * 0.25) = 4 patches kept per image"
    again = mae_reconstruction(model, x, mask_ratio=0.75, seed=5)
    assert torch.equal(again["mask"], rec["mask"]) and torch.equal(again["reconstruction"], rec["reconstruction"])
    assert not torch.equal(mae_reconstruction(model, x, mask_ratio=0.75, seed=6)["mask"], rec["mask"])
    # The model's own forward under the same noise: same loss and mask; the prediction in float64, unpatchified
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(5))
    model.eval()
    with torch.no_grad():
        loss, _, mask = model(x, mask_ratio=0.75, noise=noise)
        _, pred64, _ = float64_twin(model)(x.double(), mask_ratio=0.75, noise=noise.double())
    assert rec["loss"] == pytest.approx(loss.item(), rel=1e-6) and torch.equal(mask, rec["mask"])
    assert_rel(rec["reconstruction"], unpatchify_f64(pred64, 8, 3, 4, 4), 1e-5, "reconstruction")
    # Pictures: visible pixels are the original's, removed ones the reconstruction's (masked: zero there).
    removed = unpatchify_f64(mask[..., None].expand(-1, -1, 192), 8, 3, 4, 4).bool()
    assert torch.equal(rec["original"], x)
    assert torch.equal(rec["masked"][~removed], x[~removed]) and (rec["masked"][removed] == 0).all()
    assert torch.equal(rec["pasted"][~removed], x[~removed])
    assert torch.equal(rec["pasted"][removed], rec["reconstruction"][removed])
    assert mae_reconstruction(model, x)["mask"].sum(1).eq(12).all(), "default: the config's mask ratio 0.75"
    with pytest.raises(TypeError, match="CRATE-MAE"):
        mae_reconstruction(small_model(), x)
    with pytest.raises(ValueError, match="32x32"):
        mae_reconstruction(model, torch.randn(1, 3, 40, 40))


def test_mae_reconstruction_denormalizes_norm_pix_predictions():
    """Under norm_pix_loss a perfect prediction is the standardized target; mapped back with the target
    patch's mean and variance it is the image itself."""
    model = mae_model(norm_pix_loss=True)
    x = torch.randn(2, 3, 32, 32)
    t = x.double().reshape(2, 3, 4, 8, 4, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 16, 192)   # channel-last patches
    perfect = ((t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()).float()
    model.forward_decoder = lambda latent: perfect
    rec = mae_reconstruction(model, x, seed=1)
    assert rec["loss"] < 1e-10
    assert_rel(rec["reconstruction"], x, 1e-5, "de-normalized perfect prediction")
    assert_rel(rec["pasted"], x, 1e-5, "pasted")


# -- position tables: the notebooks' DINO formula -------------------------------------------------

def bicubic_matrix(n_out: int, n_in: int, src_per_dst: float) -> np.ndarray:
    """(n_out, n_in) float64 weights of PyTorch's bicubic resampling along one axis, written out:
    source x = (i + 0.5) * src_per_dst - 0.5, Keys' cubic with a = -0.75, taps clamped to the border."""
    a = -0.75

    def cubic(d):
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a if d < 2 else 0.0

    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * src_per_dst - 0.5
        x0 = math.floor(x)
        for k in range(-1, 3):
            m[i, min(max(x0 + k, 0), n_in - 1)] += cubic(x - (x0 + k))
    return m


def notebook_interpolate(table: np.ndarray, new_grid) -> np.ndarray:
    """The CRATE notebooks' interpolate_pos_encoding (DINO's) in float64 numpy, for a square old grid:
    scale_factor = ((h0 + 0.1) / sqrt(N), (w0 + 0.1) / sqrt(N)), so PyTorch samples the source at
    (i + 0.5) / scale - 0.5. table: (1, 1 + N, C) -> (1, 1 + h0 * w0, C)."""
    N, C = table.shape[1] - 1, table.shape[2]
    g = math.isqrt(N)
    h0, w0 = new_grid
    rows = bicubic_matrix(h0, g, math.sqrt(N) / (h0 + 0.1))
    cols = bicubic_matrix(w0, g, math.sqrt(N) / (w0 + 0.1))
    grid = table[0, 1:].reshape(g, g, C)
    out = np.einsum("ia,abc,jb->ijc", rows, grid, cols).reshape(1, h0 * w0, C)
    return np.concatenate([table[:, :1], out], axis=1)


@pytest.mark.parametrize("new_grid", [(28, 28), (20, 20), (21, 17), (9, 9), (7, 10)])
def test_dino_position_interpolation_equals_the_notebook_formula(new_grid):
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(1, 1 + 14 * 14, 24, generator=gen, dtype=torch.float64)   # unit variance, N(0, 1) init
    want = torch.from_numpy(notebook_interpolate(table.numpy(), new_grid))
    got = resample_pos_embed(table, (14, 14), new_grid, method="dino")
    assert got.shape == want.shape and got.dtype == torch.float64
    assert_rel(got, want, FP64_RTOL, f"dino 14x14 -> {new_grid}, float64")
    assert torch.equal(got[:, 0], table[:, 0]), "the CLS row is not interpolated"
    assert_rel(resample_pos_embed(table.float(), (14, 14), new_grid, method="dino"), want, FP32_RTOL,
               f"dino 14x14 -> {new_grid}, fp32")
    # The same reference with the source step g / n instead of g / (n + 0.1) is the default "size" resize:
    # the reference is PyTorch's bicubic, and the two methods differ by tenths on a unit-variance table.
    h0, w0 = new_grid
    grid = table[0, 1:].reshape(14, 14, -1).numpy()
    size_want = np.einsum("ia,abc,jb->ijc", bicubic_matrix(h0, 14, 14 / h0), grid, bicubic_matrix(w0, 14, 14 / w0))
    size = resample_pos_embed(table, (14, 14), new_grid)
    assert_rel(size[0, 1:], torch.from_numpy(size_want.reshape(h0 * w0, -1)), FP64_RTOL, "size, float64")
    assert (size - got).abs().max() > 0.1


def test_dino_position_interpolation_on_a_non_square_grid():
    """Off a square table the formula is taken per axis: rows (nh + 0.1) / gh, columns (nw + 0.1) / gw."""
    table = torch.randn(1, 1 + 6 * 4, 5, dtype=torch.float64)
    got = resample_pos_embed(table, (6, 4), (9, 7), method="dino")[0, 1:].reshape(9, 7, 5)
    want = np.einsum("ia,abc,jb->ijc", bicubic_matrix(9, 6, 6 / 9.1), table[0, 1:].reshape(6, 4, 5).numpy(),
                     bicubic_matrix(7, 4, 4 / 7.1))
    assert_rel(got, torch.from_numpy(want), FP64_RTOL, "dino 6x4 -> 9x7")


def test_default_position_interpolation_is_unchanged():
    """The model's training / inference path keeps F.interpolate(size=...), bit for bit."""
    def before(pos_embed, old, new):               # resample_pos_embed as it was before the method option
        cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
        grid = grid.reshape(1, *old, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=new, mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).to(pos_embed.dtype)], 1)

    model = small_model()                                   # 4 x 4 training grid
    for new in [(5, 6), (8, 8), (2, 3)]:
        assert torch.equal(model.pos_embed_for(new), before(model.pos_embed.detach(), (4, 4), new))
        assert torch.equal(resample_pos_embed(model.pos_embed.bfloat16(), (4, 4), new),
                           before(model.pos_embed.detach().bfloat16(), (4, 4), new))
    assert model.pos_embed_for((4, 4)) is model.pos_embed and model.pos_embed_for((4, 4), "dino") is model.pos_embed
    x = torch.randn(2, 3, 40, 48)
    with torch.no_grad():
        tokens = model.embed(x)
        assert torch.equal(tokens, model.embed(x, pos_interp="size"))
        assert not torch.equal(tokens, model.embed(x, pos_interp="dino"))
    with pytest.raises(ValueError, match="'size', 'dino' or 'zoom'"):
        resample_pos_embed(model.pos_embed, (4, 4), (4, 4), method="nearest")


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


# -- the notebooks' two-stage PCA ----------------------------------------------------------------

def pca_np(x: np.ndarray, k: int) -> np.ndarray:
    """Scores on the first k principal directions, numpy SVD in float64, signs as scikit-learn < 1.5's
    svd_flip(u_based_decision=True): the largest-|u| entry of each column of U is positive."""
    xc = x - x.mean(0)
    u, _, vt = np.linalg.svd(xc, full_matrices=False)
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    return xc @ (vt[:k] * signs[:k, None]).T


def fill_holes_np(m: np.ndarray) -> np.ndarray:
    """Background pixels 4-connected to the border stay background; every other pixel becomes foreground."""
    h, w = m.shape
    outside = np.zeros_like(m)
    stack = [(i, j) for i in range(h) for j in range(w) if (i in (0, h - 1) or j in (0, w - 1)) and not m[i, j]]
    while stack:
        i, j = stack.pop()
        if outside[i, j]:
            continue
        outside[i, j] = True
        stack += [(a, b) for a, b in ((i - 1, j), (i + 1, j), (i, j - 1), (i, j + 1))
                  if 0 <= a < h and 0 <= b < w and not m[a, b] and not outside[a, b]]
    return ~outside


def notebook_mask(f: np.ndarray, th: float, fill: bool = True) -> np.ndarray:
    """pca(n_components=1, all_together=True) + plot_pca_mask: per image min-max, > th, fill holes."""
    B, h, w, C = f.shape
    pc1 = pca_np(f.reshape(-1, C), 1).reshape(B, h, w)
    out = []
    for comp in pc1:
        m = (comp - comp.min()) / (comp.max() - comp.min()) > th
        out.append(fill_holes_np(m) if fill else m)
    return np.stack(out)


def notebook_rgb(f: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """pca(n_components=3, masks=...) + plot_pca's RGB: fitted on the masked patches of all images; per
    image the unmasked patches get real_pcas.min() - 1, then each component is min-max scaled."""
    B, h, w, C = f.shape
    flat, sel = f.reshape(B, h * w, C), mask.reshape(B, h * w)
    scores = pca_np(np.concatenate([flat[b][sel[b]] for b in range(B)]), 3)
    out, start = [], 0
    for b in range(B):
        real = np.zeros((h * w, 3))
        n = int(sel[b].sum())
        real[sel[b]] = scores[start:start + n]
        start += n
        if (~sel[b]).any():
            real[~sel[b]] = real.min() - 1
        lo, hi = real.min(0), real.max(0)
        out.append(((real - lo) / (hi - lo)).reshape(h, w, 3))
    return np.stack(out)


def blob_features(B=3, h=9, w=8, C=12, seed=0):
    """Patch features with an object: a ring (its centre patch left out) offset along one direction, plus
    noise, so the first component separates it and fill_holes has a hole to close."""
    gen = torch.Generator().manual_seed(seed)
    f = 0.3 * torch.randn(B, h, w, C, generator=gen, dtype=torch.float64)
    obj = torch.zeros(h, w, dtype=torch.bool)
    obj[2:7, 2:6] = True
    obj[4, 3] = False                                             # a hole in the object
    f[:, obj] += 3 * torch.randn(C, generator=gen, dtype=torch.float64)
    f[..., :3] += torch.randn(B, h, w, 3, generator=gen, dtype=torch.float64)   # structure for PCs 2-3
    return f.float(), obj


def test_foreground_mask_equals_the_notebook_formula():
    f, obj = blob_features()
    fn = f.double().numpy()
    for th in (0.5, 0.4):
        got = foreground_mask(f, th)
        assert got.dtype == torch.bool and got.shape == (3, 9, 8)
        np.testing.assert_array_equal(got.numpy(), notebook_mask(fn, th))
        np.testing.assert_array_equal(foreground_mask(f, th, fill_holes=False).numpy(), notebook_mask(fn, th, False))
    filled = obj.clone()
    filled[4, 3] = True
    assert torch.equal(foreground_mask(f), filled.expand(3, -1, -1)), "the object, hole filled"
    assert not foreground_mask(f, fill_holes=False)[:, 4, 3].any()
    assert torch.equal(foreground_mask(-f), foreground_mask(f)), "the sign rule makes the mask sign-free"


def test_pca_rgb_equals_the_notebook_formula():
    f, _ = blob_features(seed=1)
    fn = f.double().numpy()
    mask = foreground_mask(f)
    got = pca_rgb(f, mask)
    assert got.dtype == torch.float32 and got.shape == (3, 9, 8, 3)
    assert_rel(got, torch.from_numpy(notebook_rgb(fn, mask.numpy())), FP32_RTOL, "pca_rgb with a mask")
    assert (got[~mask] == 0).all(), "background black"
    assert (got[mask].amax(-1) > 0).all(), "no foreground patch is black"
    every = np.ones((3, 9, 8), dtype=bool)
    assert_rel(pca_rgb(f), torch.from_numpy(notebook_rgb(fn, every)), FP32_RTOL, "pca_rgb without a mask")
    assert torch.equal(pca_rgb(-f, mask), got)
    # A hand-made mask with an image left empty: that image is black, the others as the notebook computes.
    some = torch.zeros(3, 9, 8, dtype=torch.bool)
    some[0, :4] = True
    some[2, 3:] = True
    rgb = pca_rgb(f, some)
    assert (rgb[1] == 0).all()
    keep = [0, 2]
    assert_rel(rgb[keep], torch.from_numpy(notebook_rgb(fn[keep], some[keep].numpy())), FP32_RTOL, "empty image")


def test_pca_errors():
    f, _ = blob_features()
    for th in (1.0, -0.1):
        with pytest.raises(ValueError, match="threshold"):
            foreground_mask(f, th)
    with pytest.raises(ValueError, match=r"\(B, h, w, C\)"):
        foreground_mask(f[0])
    with pytest.raises(TypeError, match="floating point"):
        pca_rgb(f.long())
    with pytest.raises(ValueError, match="shape"):
        pca_rgb(f, torch.ones(3, 8, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        pca_rgb(f, torch.ones(3, 9, 8))
    with pytest.raises(ValueError, match="no patch"):
        pca_rgb(f, torch.zeros(3, 9, 8, dtype=torch.bool))


def test_pca_of_model_features_range():
    feats = patch_features(small_model(), torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 4, 4, 96) and feats.dtype == torch.float32
    for rgb in (pca_rgb(feats), pca_rgb(feats, foreground_mask(feats))):
        assert rgb.shape == (2, 4, 4, 3) and rgb.min() >= 0 and rgb.max() <= 1


def _check_outputs(out, n_images, n_layers=12, extra=()):
    """Every picture written and readable (plus `extra` files); returns stats.json."""
    from PIL import Image
    files = set(os.listdir(out))
    expected = {"stats.json", "coding_rate.png", "sparsity.png", "pca.png", *extra}
    expected |= {f"attention_{i}.png" for i in range(n_images)} | {f"masks_{i}.png" for i in range(n_images)}
    assert expected <= files
    for f in expected - {"stats.json"}:
        with Image.open(os.path.join(out, f)) as im:
            im.verify()
    stats = json.load(open(os.path.join(out, "stats.json")))
    assert stats["num_images"] == n_images and len(stats["layers"]) == n_layers
    return stats


def tiny_run_checkpoint(tmp_path, arch="crate_tiny", name="best.pt", **config):
    """What train.py writes: weights plus the resolved config (`config`: the model options it records)."""
    torch.manual_seed(0)
    fields = family_of(arch).config_class.__dataclass_fields__      # a run records pool for CRATE-MAE too
    options = {k: v for k, v in config.items() if k in fields}
    model = create_model(arch, img_size=32, patch_size=8, **({"num_classes": 5} if "num_classes" in fields else {}),
                         **options)
    ckpt = tmp_path / name
    torch.save({"model": model.state_dict(), "config": {"arch": arch, "img_size": 32, "patch_size": 8, **config}}, ckpt)
    return ckpt


def test_cli_with_a_train_checkpoint_and_image_files(tmp_path):
    from PIL import Image

    from crate_fast.analyze import main
    ckpt = tiny_run_checkpoint(tmp_path)
    paths = []
    for i in range(2):
        p = tmp_path / f"{i}.png"
        Image.fromarray((torch.rand(40, 50, 3) * 255).byte().numpy()).save(p)
        paths.append(str(p))
    out = tmp_path / "out"
    # Above the training size (40 px: a 5 x 5 grid for a 4 x 4 table), a layer and a subset of heads.
    assert main(["--ckpt", str(ckpt), "--out", str(out), "--images", *paths, "--size", "40", "--layer", "10",
                 "--heads", "5", "0", "--fg-threshold", "0.4"]) == 0
    _check_outputs(out, 2)
    stats = json.load(open(out / "stats.json"))
    assert stats["attention_layer"] == 10 and stats["attention_heads"] == [5, 0]
    assert stats["pos_interp"] == "dino" and stats["fg_threshold"] == 0.4 and stats["image_size"] == 40
    assert len(stats["foreground_fraction"]) == 2 and all(0 < v <= 1 for v in stats["foreground_fraction"])


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


def test_cli_with_crate_alpha_and_crate_mae_run_checkpoints(tmp_path):
    from crate_fast.analysis.__main__ import main
    from crate_fast.analysis.images import load_images
    from crate_fast.checkpoint import load_model
    from crate_fast.io import read_weights
    alpha = tiny_run_checkpoint(tmp_path, "crate_alpha_tiny", "alpha.pt")          # 12 layers, 3 heads
    out = tmp_path / "alpha"
    assert main(["--ckpt", str(alpha), "--out", str(out), "--images", "digits", "--heads", "2"]) == 0
    stats = _check_outputs(out, 6)
    assert stats["family"] == "crate_alpha" and stats["sparsity_of"] == "ODL codes a2"
    assert "reconstruction" not in stats and not (out / "reconstruction.png").exists()
    # CRATE-MAE: its run records mask_ratio and norm_pix_loss; --size 40 for the analysis, while the
    # reconstruction runs at the model's 32 px.
    mae = tiny_run_checkpoint(tmp_path, "mae_crate_tiny", "mae.pt", mask_ratio=0.5, norm_pix_loss=True,
                              pool="cls", data="digits")
    out = tmp_path / "mae"
    assert main(["--ckpt", str(mae), "--out", str(out), "--images", "digits", "--size", "40", "--seed", "3"]) == 0
    stats = _check_outputs(out, 6, extra=["reconstruction.png"])
    assert stats["family"] == "crate_mae" and stats["sparsity_of"] == "ISTA output" and stats["image_size"] == 40
    model, data = load_model(str(mae), None, 224, 16), read_weights(str(mae)).run_config["data"]
    assert data == "digits" and model.config.norm_pix_loss and model.config.mask_ratio == 0.5
    want = mae_reconstruction(model, load_images(["digits"], 32)[0], 0.5, seed=3)["loss"]
    assert stats["reconstruction"] == {"mask_ratio": 0.5, "seed": 3, "loss": pytest.approx(want, rel=1e-6),
                                       "norm_pix_loss": True, "num_images": 6}


def test_load_model_reads_official_files_of_every_family(tmp_path):
    from crate_fast.checkpoint import load_model
    torch.manual_seed(0)
    alpha = create_model("crate_alpha_tiny", num_classes=7, img_size=32, patch_size=8)
    torch.save(to_official_state_dict(alpha), tmp_path / "alpha.pth")
    got = load_model(str(tmp_path / "alpha.pth"), "crate_alpha_tiny", 32, 8)
    assert got.config.num_classes == 7
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in alpha.state_dict().items())
    # FAIR's container (the released CRATE-MAE file's): training arguments as an argparse.Namespace.
    mae = create_model("mae_crate_tiny", img_size=32, patch_size=8)
    args = argparse.Namespace(norm_pix_loss=True, mask_ratio=0.6, blr=1.5e-4)
    torch.save({"model": to_official_state_dict(mae), "epoch": 799, "args": args}, tmp_path / "mae.pth")
    got = load_model(str(tmp_path / "mae.pth"), "mae_crate_tiny", 32, 8)
    assert got.config.norm_pix_loss and got.config.mask_ratio == 0.6
    assert all(torch.equal(v, got.state_dict()[k]) for k, v in mae.state_dict().items())
    with pytest.raises(ValueError, match="unknown model"):
        load_model(str(tmp_path / "mae.pth"), "mae_crate_tiniest", 32, 8)


def test_cli_errors(tmp_path, capsys):
    from crate_fast.analyze import main
    assert main(["--ckpt", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "official.pth"
    torch.save({"state_dict": {}}, bad)
    assert main(["--ckpt", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "--arch" in capsys.readouterr().err
    ckpt = str(tiny_run_checkpoint(tmp_path))                  # 12 layers, 6 heads
    for flags, message in [(["--layer", "12"], "layer 12 is out of range: the model has 12 layers"),
                           (["--layer", "-13"], "layer -13 is out of range"),
                           (["--heads", "0", "6"], "head(s) [6] out of range: the model has 6 heads (0..5)"),
                           (["--heads", "2", "2"], "more than once"),
                           (["--fg-threshold", "1"], "--fg-threshold must be in [0, 1)"),
                           (["--tau", "0"], "--tau must be in (0, 1]")]:
        assert main(["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--images", "digits", *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    mae = str(tiny_run_checkpoint(tmp_path, "mae_crate_tiny", "mae.pt"))
    for ckpt_, flags, message in [(ckpt, ["--mask-ratio", "0.5"], "--mask-ratio is for CRATE-MAE models"),
                                  (mae, ["--mask-ratio", "1"], "--mask-ratio must be in (0, 1)"),
                                  (mae, ["--layer", "12"], "the model has 12 layers")]:
        assert main(["--ckpt", ckpt_, "--out", str(tmp_path / "o"), "--images", "digits", *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags
    assert not (tmp_path / "o").exists(), "nothing is written before the arguments are checked"
    with pytest.raises(SystemExit):
        main(["--ckpt", ckpt, "--out", str(tmp_path / "o"), "--pos-interp", "bilinear"])


def test_attention_overlay_shares_the_pictures_pixel_grid():
    """docs/analysis/attention_0.png had a grey strip along the right and bottom of every head's map:
    the map was drawn on extent (0, W, H, 0), the picture on matplotlib's default, half a pixel off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from crate_fast.analysis.plots import overlay
    fig, ax = plt.subplots()
    overlay(ax, np.zeros((32, 48, 3), np.uint8), np.random.default_rng(0).random((4, 6)))
    picture, heat = ax.get_images()
    assert tuple(picture.get_extent()) == tuple(heat.get_extent()) == (0, 48, 32, 0)
    plt.close(fig)


def test_default_pictures_are_scikit_images_bundled_photographs():
    """Without --images the CLI draws scikit-image's photographs (bundled, no download): every name must
    exist in the installed scikit-image (0.26 dropped motorcycle_left: the CLI crashed there)."""
    pytest.importorskip("skimage")
    from crate_fast.analysis.images import PHOTOS, load_images

    x, pics = load_images(None, 32)
    assert x.shape == (len(PHOTOS), 3, 32, 32) and pics.shape == (len(PHOTOS), 32, 32, 3) and pics.dtype == np.uint8
