"""White-box analysis: coding rate, sparsity, attention maps, position tables, the notebooks' PCA, the CLI."""
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

from crate_fast import create_model
from crate_fast.analysis import (
    attention_maps,
    coding_rate,
    expansion_rate,
    foreground_mask,
    layer_stats,
    patch_features,
    pca_rgb,
    threshold_masks,
    zero_fraction,
)
from crate_fast.layers import resample_pos_embed


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
    with pytest.raises(ValueError, match="'size' or 'dino'"):
        attention_maps(model, x, pos_interp="bilinear")


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
    with pytest.raises(ValueError, match="'size' or 'dino'"):
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


def tiny_run_checkpoint(tmp_path):
    model = create_model("crate_tiny", num_classes=5, img_size=32, patch_size=8)
    ckpt = tmp_path / "best.pt"              # what train.py writes: weights plus the resolved config
    torch.save({"model": model.state_dict(), "config": {"arch": "crate_tiny", "img_size": 32, "patch_size": 8}}, ckpt)
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

    from crate_fast.analyze import overlay
    fig, ax = plt.subplots()
    overlay(ax, np.zeros((32, 48, 3), np.uint8), np.random.default_rng(0).random((4, 6)))
    picture, heat = ax.get_images()
    assert tuple(picture.get_extent()) == tuple(heat.get_extent()) == (0, 48, 32, 0)
    plt.close(fig)
