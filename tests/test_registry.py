import dataclasses
import os
import sys

import pytest
import torch

import crate_fast
from crate_fast import CRATEConfig, create_model, list_models, registry
from crate_fast.layers import ConvPatchEmbed, CRATEBlock
from crate_fast.models._config import PatchGridConfig
from crate_fast.models.base import TokenClassifier
from crate_fast.models.family import Family

# CRATE paper Table 1 (millions) and the exact counts of the official model/crate.py, instantiated.
PAPER = {"crate_tiny": (6.09, 6_090_856), "crate_small": (13.12, 13_116_328),
         "crate_base": (22.80, 22_796_008), "crate_large": (77.64, 77_641_192)}


def test_list_models():
    assert list_models("crate") == sorted(PAPER)
    assert list_models("crate_alpha") == sorted(f"crate_alpha_{s}" for s in ("tiny", "small", "base", "large", "huge"))
    assert list_models() == sorted(n for f in crate_fast.FAMILIES.values() for n in f.presets)
    with pytest.raises(ValueError, match="unknown model family"):
        list_models("vit")


@pytest.mark.parametrize("name", sorted(PAPER))
def test_parameter_counts_match_paper(name):
    with torch.device("meta"):
        model = create_model(name)
    n = sum(p.numel() for p in model.parameters())
    assert n == PAPER[name][1]
    assert round(n / 1e6, 2) == PAPER[name][0]


def test_preset_dims():
    cfg = crate_fast.get_config("crate_small")
    assert (cfg.dim, cfg.heads, cfg.dim_head, cfg.depth) == (576, 12, 48, 12)
    assert crate_fast.get_config("crate_large").dim_head == 64
    assert cfg.num_patches == 196 and cfg.grid_size == (14, 14) and cfg.patch_dim == 768


def test_config_is_frozen_and_normalized():
    cfg = CRATEConfig(dim=64, depth=1, heads=2, img_size=(32, 48), patch_size=8)
    assert cfg.patch_size == (8, 8) and cfg.grid_size == (4, 6)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 3
    assert cfg.replace(impl="torch").impl == "torch"


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=10, depth=1, heads=3), "not divisible by heads"),
    (dict(dim=64, depth=1, heads=2, img_size=30, patch_size=4), "not divisible by patch_size"),
    (dict(dim=64, depth=1, heads=2, pool="max"), "pool must be"),
    (dict(dim=64, depth=1, heads=2, impl="cuda"), "impl must be"),
    (dict(dim=64, depth=0, heads=2), "depth must be a positive int"),
    (dict(dim=64, depth=1, heads=2, dropout=1.5), "dropout must be"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CRATEConfig(**kwargs)


def test_create_model_errors():
    with pytest.raises(ValueError, match="did you mean|Did you mean"):
        create_model("crate_tiniy")
    with pytest.raises(TypeError, match="unknown CRATE option"):
        create_model("crate_tiny", widht=3)


def test_overrides_and_set_impl():
    m = create_model("crate_tiny", num_classes=7, img_size=32, patch_size=4, depth=2, pool="mean",
                     impl="reference")
    assert m.config.depth == 2 and len(m.blocks) == 2 and m.head.out_features == 7
    keys = list(m.state_dict())
    m.set_impl("torch")
    assert m.impl == "torch" and m.config.impl == "torch" and list(m.state_dict()) == keys
    with pytest.raises(ValueError):
        m.set_impl("fast")


def test_bad_images_give_clear_errors():
    m = create_model("crate_tiny", num_classes=3, img_size=32, patch_size=4, depth=1)
    with pytest.raises(ValueError, match="input channels"):
        m(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        m(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="B, C, H, W"):
        m(torch.randn(3, 32, 32))


# ---------------------------------------------------------------------------------------------------
# A family is one bundle: a toy family registered at run time trains through train.py with no other file
# touched (docs/DESIGN.md §7)
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ToyConfig(PatchGridConfig):
    dim: int = 32
    depth: int = 1
    heads: int = 2
    dim_head: int | None = None
    img_size: int = 16
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 10
    pool: str = "cls"
    impl: str = "auto"

    def __post_init__(self):
        self._check_tokens()


class Toy(TokenClassifier):
    """Conv patches -> CLS + zero positions -> CRATE blocks -> LN -> Linear."""

    def __init__(self, config: ToyConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embed = ConvPatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim)
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_drop = torch.nn.Identity()
        self.blocks = torch.nn.ModuleList(CRATEBlock(cfg.dim, cfg.heads, impl=cfg.impl) for _ in range(cfg.depth))
        self.head_norm = torch.nn.LayerNorm(cfg.dim)
        self.head = torch.nn.Linear(cfg.dim, cfg.num_classes)
        self._init_contract()


def toy_flops(cfg, *, training=False, img_size=None):
    return 1000 * (3 if training else 1)


TOY = Family("toy", "Toy", "a test of the registry", ToyConfig, Toy, {"toy_tiny": {}}, toy_flops,
             objective="classification", train_fields=("img_size", "patch_size", "impl", "pool"))


@pytest.fixture
def toy_family():
    yield registry.register_family(TOY)
    del registry.FAMILIES[TOY.name]              # the registry as it was, for the other tests
    for name in TOY.presets:
        del registry._BY_NAME[name]


def test_a_toy_family_drops_in_through_its_bundle(toy_family, tmp_path):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import train
    from crate_fast.flops import flops_per_image

    model = create_model("toy_tiny", num_classes=3)
    assert isinstance(model, Toy) and model(torch.randn(2, 3, 16, 16)).shape == (2, 3)
    assert flops_per_image(model.config, training=True) == 3000
    with pytest.raises(ValueError, match="already registered"):
        registry.register_family(TOY)
    out = tmp_path / "toy"
    assert train.main(["--arch", "toy_tiny", "--data", "synthetic", "--synthetic-steps", "2", "--batch-size", "4",
                       "--epochs", "1", "--img-size", "16", "--patch-size", "4", "--workers", "1",
                       "--out", str(out)]) == 0
    loaded = crate_fast.load_model(str(out / "model.safetensors"))         # the file records its family
    assert isinstance(loaded, Toy) and loaded.config.num_classes == 1000
    with pytest.raises(SystemExit, match="--dropout does not apply to Toy"):
        train.resolve(train.TrainConfig(arch="toy_tiny", data="synthetic", dropout=0.1))
