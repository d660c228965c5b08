"""crate_fast models as timm models, torch.hub entry points, gradient checkpointing, safetensors.

The model-contract checks follow what timm's own model tests check of every timm model (forward,
backward, default cfg and data config, reset_classifier, forward_features / forward_head(pre_logits),
forward_intermediates), written here against our models.
"""
import os
import subprocess
import sys

import pytest
import torch
from harness import assert_rel
from tolerances import FP64_RTOL

import crate_fast
from crate_fast import create_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
timm = pytest.importorskip("timm")
SMALL = dict(num_classes=10, img_size=32, patch_size=8, depth=2)


def test_every_preset_is_a_timm_model():
    classifiers = crate_fast.list_models("crate") + crate_fast.list_models("crate_alpha")
    assert timm.list_models("crate*") == sorted(classifiers)
    assert crate_fast.timm_models.timm_models() == sorted(classifiers + crate_fast.list_models("crate_mae_cls"))
    m = timm.create_model("crate_small", num_classes=10, img_size=32, patch_size=4)
    assert isinstance(m, crate_fast.CRATE) and m.config.dim_head == 48 and m.head.out_features == 10
    assert timm.create_model("crate_tiny", global_pool="avg", **SMALL).config.pool == "mean"


def test_timm_options_the_model_lacks_and_pretrained_are_clear_errors():
    with pytest.raises(TypeError, match="drop_path_rate"):
        timm.create_model("crate_tiny", drop_path_rate=0.1)
    assert timm.create_model("crate_alpha_tiny", drop_path_rate=0.1, **SMALL).config.drop_path == 0.1
    with pytest.raises(RuntimeError, match=r"CRATE_small.pth .*not on the Hugging Face Hub.*fetch it by hand from "
                                           r"https://drive\.google\.com/.*crate_fast.load_released"):
        timm.create_model("crate_small", pretrained=True)          # pretrained tags: tests/test_hub.py
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("crate_tiny", global_pool="max", **SMALL)


@pytest.mark.parametrize("name", ["crate_tiny", "crate_small", "crate_alpha_tiny"])
def test_timm_model_contract(name):
    """timm's tests/test_models.py checks, per model: forward/backward, default cfg, data config,
    reset_classifier(0) -> num_features, forward_features + forward_head(pre_logits)."""
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "num_classes", "classifier"):
        assert key in cfg, key
    assert cfg["input_size"] == (3, 32, 32) and cfg["classifier"] == "head"
    data = timm.data.resolve_data_config({}, model=model)
    assert data["input_size"] == (3, 32, 32) and data["crop_pct"] == 224 / 256 and data["interpolation"] == "bicubic"
    assert model.get_classifier() is model.head and "pos_embed" in model.no_weight_decay()
    tokens = model.forward_features(x)
    assert tokens.shape == (2, 17, model.num_features)
    with torch.no_grad():
        pre = model.forward_head(tokens, pre_logits=True)
        assert pre.shape == (2, model.num_features)
        torch.testing.assert_close(model.head(pre), model(x), rtol=0, atol=0)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features) and model.pretrained_cfg["num_classes"] == 0
        model.reset_classifier(7, global_pool="avg")
        assert model(x).shape == (2, 7) and model.config.pool == "mean"


def test_forward_intermediates_are_the_blocks_outputs():
    torch.manual_seed(0)
    model = create_model("crate_tiny", **{**SMALL, "depth": 3}).eval()
    x = torch.randn(2, 3, 32, 40)                                       # 4 x 5 patches
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x)) and len(maps) == 3
        tokens = model.embed(x)
        for blk, fmap in zip(model.blocks, maps, strict=True):
            tokens = blk(tokens)
            assert fmap.shape == (2, 384, 4, 5)
            assert torch.equal(fmap, tokens[:, 1:].reshape(2, 4, 5, 384).permute(0, 3, 1, 2))
        nlc = model.forward_intermediates(x, [-1], output_fmt="NLC", intermediates_only=True,
                                          return_prefix_tokens=True)
        (patches, cls), = nlc
        assert torch.equal(patches, final[:, 1:]) and torch.equal(cls, final[:, :1])
        early, (last,) = model.forward_intermediates(x, [0], stop_early=True)
        assert torch.equal(last, maps[0])
    with pytest.raises(ValueError, match=r"block numbers in -3\.\.2"):
        model.forward_intermediates(x, [3])


def test_timm_default_cfg_checks():
    """timm's test_model_default_cfgs_non_std (ViT-style models), on our presets."""
    model = timm.create_model("crate_small", **SMALL).eval()
    assert model.num_classes == 10 and model.num_features > 0 and model.head_hidden_size > 0
    cfg, sd = model.default_cfg, model.state_dict()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pre = model.forward_head(tokens, pre_logits=True)
        assert tokens.shape[-1] == model.num_features and pre.shape[1] == model.head_hidden_size
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == pre.shape
        fresh = timm.create_model("crate_small", **{**SMALL, "num_classes": 0}).eval()
        assert fresh(x).shape[-1] == fresh.num_features
    assert cfg["classifier"] + ".weight" in sd and cfg["first_conv"] + ".weight" in sd


def test_timm_features_only():
    """timm's test_model_forward_features / _intermediates: features_only=True, channels and reductions
    as feature_info says, grad checkpointing leaves the output unchanged."""
    net = timm.create_model("crate_tiny", features_only=True, **{**SMALL, "depth": 4}).eval()   # last 3 blocks
    x = torch.randn(1, 3, 32, 32)
    feats = net(x)
    info = net.feature_info
    assert len(feats) == 3 and info.channels() == [384] * 3 and info.reduction() == [8] * 3
    assert all(f.shape == (1, 384, 4, 4) and not f.isnan().any() for f in feats)
    model = create_model("crate_tiny", **SMALL).eval()
    out, _ = model.forward_intermediates(x)
    assert torch.allclose(out, model.forward_features(x))
    model.set_grad_checkpointing()
    torch.testing.assert_close(model.forward_intermediates(x)[0], out)


def test_timm_feature_wrapper_takes_the_model():
    """timm's FeatureGetterNet (features_only for ViT-style models) drives forward_intermediates."""
    from timm.models._features import FeatureGetterNet
    model = create_model("crate_tiny", **SMALL)
    feats = FeatureGetterNet(model, out_indices=[0, 1], prune=False)(torch.randn(1, 3, 32, 32))
    assert [tuple(f.shape) for f in feats] == [(1, 384, 4, 4)] * 2


def test_grad_checkpointing_gives_the_same_gradients_with_less_saved_memory():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from _common import saved_activation_bytes
    grads, saved = {}, {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = create_model("crate_tiny", **SMALL).double().train()
        model.set_grad_checkpointing(ckpt)
        x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
        model(x).square().sum().backward()
        grads[ckpt] = {n: p.grad for n, p in model.named_parameters()}
        saved[ckpt] = saved_activation_bytes(lambda m=model, x=x: m(x), list(model.parameters()))
    for n, g in grads[False].items():
        assert_rel(grads[True][n], g, FP64_RTOL, n)
    assert saved[True] < 0.5 * saved[False], saved


def test_torch_hub_local_entry_points(tmp_path):
    model = torch.hub.load(ROOT, "crate_tiny", source="local", trust_repo=True, **SMALL)
    assert isinstance(model, crate_fast.CRATE) and model.head.out_features == 10
    import runpy
    entries = {k for k, v in runpy.run_path(os.path.join(ROOT, "hubconf.py")).items()
               if callable(v) and not k.startswith("_")}
    assert entries == set(crate_fast.list_models())                   # what torch.hub.list would show
    with pytest.raises(RuntimeError, match="fetch .* by hand"):
        torch.hub.load(ROOT, "crate_small", source="local", trust_repo=True, pretrained=True)


def test_import_crate_fast_without_timm():
    code = ("import sys; sys.modules['timm'] = None\n"
            "import crate_fast\n"
            "m = crate_fast.create_model('crate_tiny', num_classes=3, img_size=16, patch_size=8, depth=1)\n"
            "assert m.pretrained_cfg['input_size'] == (3, 16, 16)\n"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_safetensors_round_trip(tmp_path):
    src = create_model("crate_tiny", **SMALL)
    crate_fast.save_weights(src, tmp_path / "model.safetensors")
    dst = create_model("crate_tiny", **SMALL)
    crate_fast.load_weights(dst, str(tmp_path / "model.safetensors"))
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    assert os.listdir(tmp_path) == ["model.safetensors"]          # no temporary file left behind


def test_features_only_checks_its_blocks_at_creation():
    with pytest.raises(ValueError, match="1 <= n <= 2"):
        timm.create_model("crate_tiny", features_only=True, **SMALL)       # timm's default: the last 3 blocks
    with pytest.raises(ValueError, match="block numbers in -2..1"):
        timm.create_model("crate_tiny", features_only=True, out_indices=(5,), **SMALL)


def test_torch_hub_loads_a_checkout_that_is_not_installed(tmp_path):
    """torch.hub.load(CHECKOUT) works without pip install: kernels/ and data/ are mapped into crate_fast as
    setup.py's package_dir does (hubconf.py). Simulated in a fresh interpreter by removing setuptools'
    editable-install finders and every site-packages path entry naming this checkout."""
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]\n"
            "sys.path_hooks[:] = [h for h in sys.path_hooks if '__editable__' not in getattr(h, '__module__', '')]\n"
            "sys.path_importer_cache.clear()\n"
            f"sys.path[:] = [p for p in sys.path if p not in ('', {ROOT!r})]\n"
            "import importlib.util\n"
            "assert importlib.util.find_spec('crate_fast') is None, 'crate_fast is still importable'\n"
            "import torch\n"
            f"m = torch.hub.load({ROOT!r}, 'crate_tiny', source='local', trust_repo=True, num_classes=3,"
            " img_size=16, patch_size=8, depth=1)\n"
            "import crate_fast.kernels, crate_fast.data\n"
            f"assert crate_fast.kernels.__file__.startswith({ROOT!r})\n"
            f"assert crate_fast.data.__file__.startswith({ROOT!r})\n"
            "print(type(m).__name__, m(torch.randn(1, 3, 16, 16)).shape)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == "CRATE torch.Size([1, 3])", p.stderr[-3000:]


def test_no_classifier_and_no_pooling_give_the_tokens():
    """timm's feature-extraction pattern: num_classes=0, global_pool="" (timm issue #2682)."""
    model = timm.create_model("crate_tiny", global_pool="", **{**SMALL, "num_classes": 0})
    x = torch.randn(2, 3, 32, 32)
    tokens = model.forward_features(x)
    assert model(x).shape == (2, 17, 384) and torch.equal(model(x), model.head_norm(tokens))
    model = create_model("crate_tiny", **SMALL)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 17, 384) and model.config.pool == "none"
