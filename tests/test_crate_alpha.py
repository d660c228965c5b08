"""CRATE-alpha against a transcription of the official PyTorch port (tests/official_crate_alpha.py):
parameter counts, the official key layout, same logits for every impl, float64 gradients, the state_dict
round trip, fine-tuning at another patch size, and the recipe's weight-decay mask."""
import pytest
import torch
from conftest import KERNEL_DEVICE
from harness import assert_2x_rule, assert_rel
from official_crate_alpha import OfficialCRATEAlpha, official_base, official_large
from tolerances import FP64_RTOL

import crate_fast
import crate_fast.training.optim
from crate_fast import create_model, load_official_state_dict, to_official_state_dict
from crate_fast.layers import resample_pos_embed, resize_patch_kernel
from crate_fast.models.keys import official_key

# Small CRATE-alpha: head dims 48 and 64, 17 or 65 tokens, odd batch.
SMALL = [dict(dim=96, heads=2, img_size=16, patch_size=4),    # dim_head 48, N = 17
         dict(dim=128, heads=2, img_size=32, patch_size=4)]   # dim_head 64, N = 65


def pair(cfg, impl="reference", depth=2, num_classes=5, dtype=torch.float32):
    """(official oracle, our model) holding the same weights."""
    torch.manual_seed(1)
    off = OfficialCRATEAlpha(image_size=cfg["img_size"], patch_size=cfg["patch_size"], num_classes=num_classes,
                             dim=cfg["dim"], depth=depth, heads=cfg["heads"], dim_head=cfg["dim"] // cfg["heads"])
    with torch.no_grad():        # trained-looking scales: the port's randn positions would swamp the rest
        off.pos_embedding.mul_(0.02)
    ours = create_model("crate_alpha_tiny", num_classes=num_classes, depth=depth, impl=impl, **cfg)
    load_official_state_dict(ours, off.state_dict())
    return off.to(dtype), ours.to(dtype)


def images(cfg, batch=3, dtype=torch.float32):
    return torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], dtype=dtype)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,patch,classes,expected", [
    ("crate_alpha_base", 16, 1000, 72_328_936), ("crate_alpha_base", 32, 1000, 73_985_512),
    ("crate_alpha_base", 8, 1000, 72_338_152), ("crate_alpha_large", 14, 1000, 253_650_920),
    ("crate_alpha_large", 32, 1000, 255_982_568), ("crate_alpha_large", 8, 1000, 253_786_088),
    ("crate_alpha_base", 16, 19167, 86_299_359), ("crate_alpha_large", 14, 19167, 272_272_095),
])
def test_parameter_counts_are_the_official_ports(name, patch, classes, expected):
    with torch.device("meta"):
        assert n_params(create_model(name, patch_size=patch, num_classes=classes)) == expected


@pytest.mark.parametrize("ours,official", [("crate_alpha_base", official_base), ("crate_alpha_large", official_large)])
def test_official_key_layout_at_published_shapes(ours, official):
    """B/16 and L/14: our state_dict under official names is exactly the port's keys and shapes."""
    with torch.device("meta"):
        model, off = create_model(ours), official()
    mine = {k: tuple(v.shape) for k, v in to_official_state_dict(model).items()}
    theirs = {k: tuple(v.shape) for k, v in off.state_dict().items()}
    assert mine == theirs
    assert model.config.patch_size == ((16, 16) if ours == "crate_alpha_base" else (14, 14))


@pytest.mark.parametrize("cfg", SMALL, ids=["d48", "d64"])
def test_same_logits_as_the_official_port_fp32(cfg):
    x = images(cfg)
    off, _ = pair(cfg)
    truth = off.double()(x.double())
    for impl in ("reference", "torch"):
        _, ours = pair(cfg, impl)
        assert_rel(ours(x), truth, what=impl)
        assert_rel(off.float()(x), truth, what="the port itself in fp32")


def test_triton_impl_logits_fp32():
    cfg = SMALL[0]
    x = images(cfg, batch=1)
    off, ours = pair(cfg, "triton", depth=1)
    truth = off.double()(x.double())
    assert_rel(ours.to(KERNEL_DEVICE)(x.to(KERNEL_DEVICE)).cpu(), truth, what="triton")


@pytest.mark.parametrize("cfg", SMALL, ids=["d48", "d64"])
def test_gradients_float64(cfg):
    """Every parameter gradient of every impl against the port's autograd, in float64 (docs/DESIGN.md §5)."""
    x = images(cfg, dtype=torch.float64)
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    off, _ = pair(cfg, dtype=torch.float64)
    (off(x) * g).sum().backward()
    truth = {k: p.grad for k, p in off.named_parameters()}
    for impl in ("reference", "torch"):
        _, ours = pair(cfg, impl, dtype=torch.float64)
        (ours(x) * g).sum().backward()
        grads = {official_key(ours, n): p.grad for n, p in ours.named_parameters()}
        assert grads.keys() == truth.keys()
        for k, t in truth.items():
            assert t.abs().max() > 0, k
            assert_rel(grads[k], t, FP64_RTOL, f"{impl} {k}")


def test_bf16_autocast_2x_rule():
    cfg = SMALL[1]
    x = images(cfg)
    off, ours = pair(cfg, "torch")
    truth = off.double()(x.double())
    off.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, got = off(x), ours(x)
    assert got.dtype == plain.dtype == torch.bfloat16
    assert_2x_rule(got, plain, truth, what="logits")


def test_state_dict_round_trip_is_exact():
    off, ours = pair(SMALL[0])
    back = to_official_state_dict(ours)
    ref = off.state_dict()
    assert list(back) == list(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    again = create_model("crate_alpha_tiny", num_classes=5, depth=2, **SMALL[0])
    load_official_state_dict(again, back)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(), strict=True))


def test_strict_loading_lists_what_differs():
    off, _ = pair(SMALL[0])
    sd = off.state_dict()
    sd.pop("transformer.layers.1.1.fn.D1")
    sd["transformer.layers.0.0.fn.to_out.0.bias"] = torch.zeros(96)        # CRATE's MSSA has a bias here
    model = create_model("crate_alpha_tiny", num_classes=5, depth=2, **SMALL[0])
    with pytest.raises(RuntimeError, match=r"(?s)missing keys.*layers.1.1.fn.D1.*unexpected keys.*to_out.0.bias"):
        load_official_state_dict(model, sd)


def test_finetuning_at_another_patch_size_resizes_the_stem_and_positions(caplog):
    """A /8 checkpoint seeds a /4 model: the stem kernel resized bilinearly (antialiased when shrinking,
    as jax.image.resize), the position grid resampled as scipy.ndimage.zoom(order=1), the head reset."""
    torch.manual_seed(0)
    src = OfficialCRATEAlpha(image_size=32, patch_size=8, num_classes=7, dim=64, depth=1, heads=2, dim_head=32)
    model = create_model("crate_alpha_tiny", num_classes=5, depth=1, dim=64, heads=2, img_size=32, patch_size=4)
    load_official_state_dict(model, src.state_dict(), reset_head=True)
    sd = src.state_dict()
    assert torch.equal(model.patch_embed.proj.weight, resize_patch_kernel(sd["conv1.weight"], (4, 4)))
    assert torch.equal(model.pos_embed, resample_pos_embed(sd["pos_embedding"], (4, 4), (8, 8), "zoom"))
    assert torch.equal(model.blocks[0].odl.D, sd["transformer.layers.0.1.fn.D"])
    report = caplog.text                                  # never silently: the resizes are reported
    assert "pos_embedding from a 4x4 to a 8x8 patch grid" in report and "conv1.weight from 8x8 to 4x4" in report
    # CRATE's patch embedding is a Linear: another patch size stays an error there
    crate_src = create_model("crate_tiny", num_classes=5, depth=1, dim=64, heads=2, img_size=32, patch_size=8)
    crate_dst = create_model("crate_tiny", num_classes=5, depth=1, dim=64, heads=2, img_size=32, patch_size=4)
    with pytest.raises(RuntimeError, match="shape mismatches"):
        crate_fast.load_weights(crate_dst, crate_src.state_dict())


def test_resize_patch_kernel_matches_the_bilinear_formula():
    """Upsampling 2 -> 4 with half-pixel centers: output pixel i reads source (i + 0.5) / 2 - 0.5, edges
    clamped; an independent float64 evaluation of that formula."""
    w = torch.randn(3, 2, 2, 2, dtype=torch.float64)
    out = resize_patch_kernel(w, (4, 4))
    coords = [min(max((i + 0.5) / 2 - 0.5, 0.0), 1.0) for i in range(4)]
    lin = torch.tensor([[1 - c, c] for c in coords], dtype=torch.float64)       # (4 out, 2 in)
    assert torch.allclose(out, torch.einsum("ia,jb,dcab->dcij", lin, lin, w), atol=1e-12)


def test_drop_path_is_stochastic_in_training_only():
    pytest.importorskip("timm")
    cfg = SMALL[0]
    torch.manual_seed(4)
    m = create_model("crate_alpha_tiny", num_classes=5, depth=3, drop_path=0.5, **cfg)
    rates = [blk.drop_path.drop_prob if blk.drop_path is not None else 0.0 for blk in m.blocks]
    assert rates == [0.0, 0.25, 0.5]                     # linear from 0, the JAX trainer's schedule
    x = images(cfg)
    plain = create_model("crate_alpha_tiny", num_classes=5, depth=3, **cfg)
    plain.load_state_dict(m.state_dict())
    m.eval()
    assert torch.equal(m(x), plain(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_weight_decay_mask_is_the_official_recipes():
    """The JAX recipe decays params matching '.*/kernel$': the stem, MSSA projections and the head."""
    m = create_model("crate_alpha_tiny", num_classes=5, depth=2, **SMALL[0])
    decayed = {n for n, _ in m.named_parameters()} - m.no_weight_decay()
    assert decayed == {"patch_embed.proj.weight", "head.weight"} | {
        f"blocks.{i}.attn.{p}.weight" for i in range(2) for p in ("qkv", "out")}
    groups = crate_fast.training.optim.param_groups(m, 0.1, True)
    assert sum(p.numel() for p in groups[0]["params"]) == sum(p.numel() for n, p in m.named_parameters()
                                                              if n in decayed)


def test_config_checks_and_head_norm_eps():
    assert create_model("crate_alpha_tiny").head_norm.eps == 1e-5        # the port's (its weights' numbers)
    assert create_model("crate_alpha_tiny", head_norm_eps=1e-6).head_norm.eps == 1e-6   # the JAX model's
    for bad in (dict(overcomplete_ratio=0), dict(drop_path=1.0), dict(head_norm_eps=0.0)):
        with pytest.raises(ValueError):
            create_model("crate_alpha_tiny", **bad)
    m = create_model("crate_alpha_tiny", num_classes=3, img_size=32, patch_size=8)
    assert m.blocks[0].odl.D.shape == (192, 768) and m.blocks[0].attn.out.bias is None
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 3, 30, 32))


def test_released_files_are_known_and_load_in_one_call(tmp_path):
    """The port's raw state_dicts of B/16 and L/14 (layout built on the meta device) are identified."""
    from crate_fast import RELEASED, identify

    for name, official in (("crate_alpha_base_in1k", official_base), ("crate_alpha_large_in1k", official_large)):
        with torch.device("meta"):
            sd = official().state_dict()
        assert identify(sd) is RELEASED[name]
    torch.manual_seed(0)
    off = official_base()
    path = tmp_path / "crate_alpha_B16.pth"
    torch.save(off.state_dict(), path)
    model = crate_fast.load_released(str(path), impl="torch")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_rel(model(x), off.double()(x.double()), what="B/16 logits")


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_l14_widths_at_224px_same_logits(impl):
    """L/14's width, heads and patch at 224 px (257 tokens), two of its 24 layers to keep the test short."""
    torch.manual_seed(0)
    off = OfficialCRATEAlpha(image_size=224, patch_size=14, num_classes=1000, dim=1024, depth=2, heads=16)
    model = create_model("crate_alpha_large", depth=2, impl=impl)
    load_official_state_dict(model, off.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_rel(model(x), off.double()(x.double()), what="L/14 logits")
