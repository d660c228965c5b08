"""CRATE-MAE (crate_fast.models.crate_mae) against a transcription of the official crate_ae code
(tests/official_crate_mae.py): sizes and keys, same weights and noise -> same (loss, pred, mask) for every
impl, float64 gradients, the state_dict round trip and FAIR's checkpoint file, the sin-cos table,
masking, errors, bf16 autocast."""
import argparse
import copy

import pytest
import torch
from conftest import KERNEL_DEVICE
from harness import assert_2x_rule, assert_rel
from official_crate_mae import get_2d_sincos_pos_embed, mae_crate
from tolerances import FP64_RTOL

from crate_fast import (
    create_model,
    get_config,
    list_models,
    load_official_state_dict,
    load_weights,
    to_official_state_dict,
)
from crate_fast.models.crate_mae import CRATEMAE, CRATEMAEConfig, sincos_pos_embed_2d
from crate_fast.models.keys import crate_fast_key, official_key

# dim 64, 2 heads of 32, 32 px / patch 8: 16 patches (17 tokens), 4 kept at the default ratio 0.75.
SMALL = dict(dim=64, heads=2, depth=2, decoder_depth=3, img_size=32, patch_size=8)
L = 16


def official(norm_pix_loss=False):
    """The oracle at SMALL's sizes, every trainable tensor moved off its init (LayerNorms and biases too),
    so a skipped or misplaced tensor shows."""
    torch.manual_seed(0)
    m = mae_crate(64, 2, 2, decoder_depth=3, img_size=32, patch_size=8, norm_pix_loss=norm_pix_loss)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return m


def ours_from(off, impl="torch", **kw):
    model = create_model("mae_crate_tiny", **SMALL, impl=impl, norm_pix_loss=off.norm_pix_loss, **kw)
    return load_official_state_dict(model, off.state_dict())


def images(batch=3, dtype=torch.float32, size=32):
    return torch.randn(batch, 3, size, size, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# (a) sizes, parameter counts, keys
# ---------------------------------------------------------------------------------------------------
# crate_family.md §2.2, counted on the official code: every state_dict entry, trainable, dead decoder_embed
COUNTS = {"mae_crate_tiny": (11_555_328, 11_404_032, 147_840),
          "mae_crate_small": (25_405_824, 25_178_880, 332_352),
          "mae_crate_base": (44_638_464, 44_335_872, 590_592),
          "mae_crate_large": (154_274_560, 153_871_104, 1_049_600)}


def test_registry():
    assert list_models("crate_mae") == sorted([*COUNTS, "mae_crate_digits"])    # + the CPU demo's size (ours)
    cfg = get_config("mae_crate_digits")
    assert (cfg.dim, cfg.heads, cfg.depth, cfg.decoder_depth) == (192, 3, 4, 4)
    cfg = get_config("mae_crate_small")
    assert (cfg.dim, cfg.heads, cfg.dim_head, cfg.depth, cfg.decoder_depth) == (576, 12, 48, 12, 12)
    assert (cfg.lambd, cfg.step_size, cfg.mask_ratio, cfg.norm_pix_loss) == (0.5, 0.1, 0.75, False)
    assert get_config("mae_crate_large").decoder_depth == 24
    model = create_model("mae_crate_tiny", img_size=32, patch_size=4)
    assert isinstance(model, CRATEMAE) and model.config.num_patches == 64 and model.num_features == 384


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_parameter_counts(name):
    with torch.device("meta"):
        model = create_model(name)
    total, trainable, dead = COUNTS[name]
    assert sum(v.numel() for v in to_official_state_dict(model).values()) == total
    assert sum(p.numel() for p in model.parameters()) == total        # the tables are (frozen) parameters
    # the official trainable count less the dead decoder_embed, which we freeze (DDP needs every
    # trainable parameter to get a gradient)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == trainable - dead
    assert sum(p.numel() for p in model.decoder_embed.parameters()) == dead


def test_base_official_keys_and_shapes():
    d = 768
    want = {"cls_token": (1, 1, d), "pos_embed": (1, 197, d), "mask_token": (1, 1, d),
            "decoder_pos_embed": (1, 197, d), "patch_embed.proj.weight": (d, 3, 16, 16),
            "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,),
            "decoder_embed.weight": (d, d), "decoder_embed.bias": (d,), "decoder_norm.weight": (d,),
            "decoder_norm.bias": (d,), "decoder_pred.weight": (768, d), "decoder_pred.bias": (768,)}
    for i in range(12):
        enc, dec = f"blocks.{i}.layers.0.", f"decoder_blocks.{i}.layers.0."
        want.update({f"{enc}0.norm.weight": (d,), f"{enc}0.norm.bias": (d,), f"{enc}0.fn.qkv.weight": (d, d),
                     f"{enc}0.fn.to_out.0.weight": (d, d), f"{enc}0.fn.to_out.0.bias": (d,),
                     f"{enc}1.norm.weight": (d,), f"{enc}1.norm.bias": (d,), f"{enc}1.fn.weight": (d, d),
                     f"{dec}0.norm.weight": (d,), f"{dec}0.norm.bias": (d,), f"{dec}0.fn.weight": (d, d),
                     f"{dec}1.norm.weight": (d,), f"{dec}1.norm.bias": (d,), f"{dec}1.fn.qkv.weight": (d, d),
                     f"{dec}1.fn.to_out.0.weight": (d, d), f"{dec}1.fn.to_out.0.bias": (d,)})
    with torch.device("meta"):
        model = create_model("mae_crate_base")
        oracle = mae_crate(768, 12, 12)
    got = {k: tuple(v.shape) for k, v in to_official_state_dict(model).items()}
    assert len(got) == 206 and got == want
    assert list(got) == list(oracle.state_dict())            # same keys, same order as the official model
    assert model.norm.eps == model.decoder_norm.eps == 1e-6
    assert model.blocks[0].norm1.eps == model.decoder_blocks[0].norm2.eps == 1e-5


def test_key_maps_are_inverse():
    model = create_model("mae_crate_tiny", **SMALL)
    for k in model.state_dict():
        assert crate_fast_key(model, official_key(model, k)) == k


def test_same_seed_same_init_as_official():
    torch.manual_seed(3)
    off = mae_crate(64, 2, 2, decoder_depth=3, img_size=32, patch_size=8)
    torch.manual_seed(3)
    ours = create_model("mae_crate_tiny", **SMALL)
    ref = off.state_dict()
    for k, v in to_official_state_dict(ours).items():
        assert torch.equal(v, ref[k]), k


# ---------------------------------------------------------------------------------------------------
# (b) same weights, same noise: same (loss, pred, mask); (c) float64 gradients
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm_pix_loss", [False, True], ids=["pix", "normpix"])
@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_same_loss_pred_mask_as_official_fp32(impl, norm_pix_loss):
    off = official(norm_pix_loss)
    x, noise = images(batch=2 if impl == "triton" else 3), torch.rand(2 if impl == "triton" else 3, L)
    with torch.no_grad():
        loss, pred, mask = copy.deepcopy(off).double()(x.double(), 0.75, noise)
    dev = KERNEL_DEVICE if impl == "triton" else "cpu"
    model = ours_from(off, impl).to(dev)
    with torch.no_grad():
        got = model(x.to(dev), noise=noise.to(dev))
    assert_rel(got[0].cpu(), loss, what=f"{impl} loss")
    assert_rel(got[1].cpu(), pred, what=f"{impl} pred")
    assert torch.equal(got[2].cpu(), mask) and mask.dtype == got[2].dtype == torch.float32


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_gradients_float64(impl):
    """Every parameter's gradient of loss + <pred, g>; the dead decoder_embed and the tables get none."""
    off = official(norm_pix_loss=True).double()
    model = ours_from(off, impl).double()
    x, noise = images(dtype=torch.float64), torch.rand(3, L)
    g = torch.randn(3, L, 192, dtype=torch.float64)
    for m in (off, model):
        loss, pred, _ = m(x, 0.75, noise)
        (loss + (pred * g).sum()).backward()
    theirs = dict(off.named_parameters())
    for name, p in model.named_parameters():
        ref = theirs[official_key(model, name)]
        assert p.requires_grad == ref.requires_grad or name.startswith("decoder_embed."), name     # frozen here
        if not p.requires_grad or name.startswith("decoder_embed."):
            assert p.grad is None and ref.grad is None, name
            continue
        assert p.grad is not None and p.grad.abs().max() > 0, name
        assert_rel(p.grad, ref.grad, FP64_RTOL, name)


def test_grad_checkpointing_same_gradients():
    model = ours_from(official()).double()
    x, noise = images(dtype=torch.float64), torch.rand(3, L)
    grads = []
    for remat in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(remat)
        model(x, noise=noise)[0].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert_rel(grads[1][n], g, FP64_RTOL, n)


def test_set_impl_switches_every_layer_and_keeps_the_weights():
    model = ours_from(official(), "reference")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.set_impl("torch") is model and model.impl == model.config.impl == "torch"
    assert {m.impl for m in model.modules() if hasattr(m, "impl") and m is not model} == {"torch"}
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("what", ["loss", "pred"])
def test_torch_impl_bf16_autocast(what):
    off = official(norm_pix_loss=True)
    x, noise = images(), torch.rand(3, L)
    with torch.no_grad():
        loss, pred, _ = copy.deepcopy(off).double()(x.double(), 0.75, noise)
        truth = {"loss": loss, "pred": pred}
        out = {}
        for impl in ("reference", "torch"):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, pred, _ = ours_from(off, impl)(x, noise=noise)
            out[impl] = {"loss": loss, "pred": pred}
    assert out["torch"]["pred"].dtype == torch.bfloat16 and out["torch"]["loss"].dtype == torch.float32
    assert_2x_rule(out["torch"][what], out["reference"][what], truth[what], what=what)


# ---------------------------------------------------------------------------------------------------
# (d) the official layout both ways, FAIR's checkpoint file
# ---------------------------------------------------------------------------------------------------
def test_round_trip_gives_back_the_official_state_dict():
    off = official()
    back = to_official_state_dict(ours_from(off))
    ref = off.state_dict()
    assert list(back) == list(ref)
    assert all(back[k].shape == v.shape and torch.equal(back[k], v) for k, v in ref.items())
    fresh = mae_crate(64, 2, 2, decoder_depth=3, img_size=32, patch_size=8)
    fresh.load_state_dict(back, strict=True)


def test_fair_checkpoint_file_loads_safely(tmp_path):
    """main_pretrain.py's save_model: {'model', 'optimizer', 'epoch', 'scaler', 'args': Namespace}."""
    off = official()
    sd = off.state_dict()
    path = tmp_path / "crate-mae-checkpoint-799.pth"
    torch.save({"model": sd,
                "optimizer": {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}},
                              "param_groups": [{"lr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05,
                                                "params": [0]}]},
                "epoch": 799, "scaler": {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0},
                "args": argparse.Namespace(model="mae_crate_base", norm_pix_loss=False, mask_ratio=0.75,
                                           blr=1.5e-4, weight_decay=0.05)}, path)
    for load in (load_weights, load_official_state_dict):
        model = create_model("mae_crate_tiny", **SMALL)
        load(model, str(path))                      # weights_only: nothing in the file runs
        back = to_official_state_dict(model)
        assert all(torch.equal(back[k], v) for k, v in sd.items())
    ours = create_model("mae_crate_tiny", **SMALL)
    load_weights(ours, model.state_dict())          # our own layout through the same loader
    assert torch.equal(ours.decoder_blocks[2].dictionary.weight, sd["decoder_blocks.2.layers.0.0.fn.weight"])


def test_a_file_of_another_grid_is_a_shape_error_not_a_resampled_table():
    model = create_model("mae_crate_tiny", **{**SMALL, "img_size": 48})
    with pytest.raises(RuntimeError, match=r"decoder_pos_embed: checkpoint \(1, 17, 64\) vs model \(1, 37, 64\)"):
        load_official_state_dict(model, official().state_dict())


# ---------------------------------------------------------------------------------------------------
# (e) the fixed 2-D sin-cos table
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,grid", [(768, 14), (1024, 14), (576, 14), (384, 7), (64, 4)])
def test_sincos_table_is_bit_identical_to_fair(dim, grid):
    fair = torch.from_numpy(get_2d_sincos_pos_embed(dim, grid, cls_token=True)).float()
    assert torch.equal(sincos_pos_embed_2d(dim, (grid, grid)), fair)


def test_model_tables_and_rectangular_grids():
    off, ours = official(), create_model("mae_crate_tiny", **SMALL)
    assert torch.equal(ours.pos_embed, off.pos_embed) and torch.equal(ours.decoder_pos_embed, off.decoder_pos_embed)
    assert not ours.pos_embed.requires_grad and not ours.decoder_pos_embed.requires_grad
    # a 2 x 3 grid holds the rows of the 4 x 4 one at the same (row, column)
    square, rect = sincos_pos_embed_2d(8, (4, 4)), sincos_pos_embed_2d(8, (2, 3))
    for i in range(2):
        for j in range(3):
            assert torch.equal(rect[1 + i * 3 + j], square[1 + i * 4 + j])
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(66, (2, 2))


# ---------------------------------------------------------------------------------------------------
# (f) masking, patches, features
# ---------------------------------------------------------------------------------------------------
def test_random_masking_keeps_the_lowest_noise_patches():
    model = create_model("mae_crate_tiny", **SMALL)
    x = torch.randn(4, 196, 8)
    for ratio in (0.0, 0.5, 0.75, 0.9):
        noise = torch.rand(4, 196)
        kept, mask, ids_restore = model.random_masking(x, ratio, noise)
        keep = int(196 * (1 - ratio))
        assert kept.shape == (4, keep, 8) and (mask.sum(1) == 196 - keep).all()
        order = noise.argsort(dim=1)
        assert torch.equal(kept, torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, 8)))
        assert torch.equal(mask, (noise.argsort(1).argsort(1) >= keep).float())
        assert torch.equal(torch.gather(order, 1, ids_restore), torch.arange(196).expand(4, -1))


def test_noise_reproducibility_and_loss_over_masked_patches_only():
    model = ours_from(official())
    x, noise = images(), torch.rand(3, L)
    a, b = model(x, noise=noise), model(x, noise=noise)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert (a[2].sum(1) == L - int(L * (1 - 0.75))).all()
    torch.manual_seed(5)
    c = model(x)
    torch.manual_seed(5)
    assert torch.equal(model(x)[2], c[2]) and not torch.equal(c[2], a[2])
    loss, pred, mask = a
    visible = pred + 5.0 * (1 - mask)[..., None]
    assert torch.equal(model.forward_loss(x, visible, mask), loss)
    assert model.forward_loss(x, pred + 5.0 * mask[..., None], mask) > loss + 1
    half = create_model("mae_crate_tiny", **SMALL, mask_ratio=0.5)
    assert (half(x)[2].sum(1) == 8).all() and (half(x, 0.25)[2].sum(1) == 4).all()


def test_patchify_unpatchify_match_official():
    off, model = official(), create_model("mae_crate_tiny", **SMALL)
    x = images()
    patches = model.patchify(x)
    assert torch.equal(patches, off.patchify(x)) and torch.equal(model.unpatchify(patches), x)
    assert torch.equal(off.unpatchify(patches), x)
    rect = create_model("mae_crate_tiny", **{**SMALL, "img_size": (32, 48)})
    y = torch.randn(2, 3, 32, 48)
    assert torch.equal(rect.unpatchify(rect.patchify(y)), y)
    assert rect.patchify(y).shape == (2, 24, 192)


def test_features_are_the_unmasked_encoder():
    model = ours_from(official())
    x = images()
    feats = model.forward_features(x)
    latent, mask, _ = model.forward_encoder(x, 0.0)       # keeps every patch, shuffled and put back
    assert torch.equal(feats, latent) and not mask.any()
    assert torch.equal(model.pooled(x), feats[:, 0])
    assert torch.equal(model.pooled(x, pool="mean"), feats[:, 1:].mean(1))
    assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])


def test_features_at_another_size_as_the_official_attention_helper():
    """48 px (6 x 6 patches on a 4 x 4 table): decoder_pos_embed interpolated as interpolate_pos_encoding."""
    off = official()
    model = ours_from(off)
    x = images(batch=2, size=48)
    with torch.no_grad():
        o = copy.deepcopy(off).double()
        t = o.prepare_tokens(x.double())
        for blk in o.blocks:
            t = blk(t)
        truth = o.norm(t)
        assert_rel(model.forward_features(x), truth, what="features at 48 px")


# ---------------------------------------------------------------------------------------------------
# (g) clear errors
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_are_clear_value_errors():
    model = create_model("mae_crate_tiny", **SMALL)
    x = images()
    with pytest.raises(ValueError, match=r"needs 32x32 images .* got 48x48.*forward_features"):
        model(images(size=48))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model.forward_features(images(size=36))
    with pytest.raises(ValueError, match=r"shape \(B, C, H, W\)"):
        model(torch.randn(3, 32, 32))
    for ratio in (1.0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match=r"mask_ratio must be a number in \[0, 1\)"):
            model(x, ratio)
    with pytest.raises(ValueError, match=r"noise must have shape \(batch, patches\) = \(3, 16\)"):
        model(x, noise=torch.rand(3, 17))
    with pytest.raises(ValueError, match="pool must be one of"):
        model.pooled(x, pool="max")
    with pytest.raises(ValueError, match=r"expected patches of shape \(B, 16, 192\)"):
        model.unpatchify(torch.randn(2, 15, 192))
    with pytest.raises(ValueError, match="do not fit the images' patches"):
        model.forward_loss(x, torch.randn(3, 16, 191), torch.ones(3, 16))


@pytest.mark.parametrize("bad,match", [
    (dict(dim=66, heads=2), "multiple of 4"),
    (dict(mask_ratio=1.0), "mask_ratio"),
    (dict(lambd=-0.1), "lambd"),
    (dict(step_size=0.0), "step_size"),
    (dict(decoder_depth=0), "decoder_depth"),
    (dict(img_size=30), "not divisible by patch_size"),
    (dict(norm_pix_loss=1), "norm_pix_loss"),
    (dict(impl="cuda"), "impl"),
])
def test_bad_config_is_a_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        CRATEMAEConfig(**{"dim": 64, "depth": 1, "heads": 2, "img_size": 32, "patch_size": 8, **bad})


# ---------------------------------------------------------------------------------------------------
# The pretrained encoder as a classifier (fine-tuning)
# ---------------------------------------------------------------------------------------------------
def test_a_pretrained_encoder_loads_into_the_classifier_from_either_layout(caplog):
    """Our CRATE-MAE state_dict and the official layout both load into mae_crate_*_cls: the classifier's
    pre-logits equal the MAE encoder's pooled CLS features exactly; the decoder is skipped and reported."""
    torch.manual_seed(0)
    mae = create_model("mae_crate_tiny", img_size=32, patch_size=8, depth=2, decoder_depth=1)
    x = torch.randn(2, 3, 32, 32)
    for sd in (mae.state_dict(), to_official_state_dict(mae)):
        cls = create_model("mae_crate_tiny_cls", img_size=32, patch_size=8, depth=2, num_classes=7)
        load_weights(cls, sd, reset_head="auto")
        with torch.no_grad():
            assert torch.equal(cls.forward_head(cls.forward_features(x), pre_logits=True), mae.pooled(x))
        assert cls(x).shape == (2, 7)
        assert "skipped" in caplog.text
        caplog.clear()
    # without reset_head the missing classifier is an error, as any missing key
    cls = create_model("mae_crate_tiny_cls", img_size=32, patch_size=8, depth=2, num_classes=7)
    with pytest.raises(RuntimeError, match="missing keys.*head.weight"):
        load_weights(cls, mae.state_dict())
    # an encoder of another depth is still a strict error
    deeper = create_model("mae_crate_tiny_cls", img_size=32, patch_size=8, depth=3, num_classes=7)
    with pytest.raises(RuntimeError, match="missing keys.*blocks.2"):
        load_weights(deeper, mae.state_dict(), reset_head="auto")
