"""Every model family's bundle (models/family.py) by name, and ``create_model``: the front door users,
train.py, timm and the loaders share. Adding a family: its file under models/, one row here, tests."""
from __future__ import annotations

import difflib

from torch import nn

from .models import crate, crate_alpha, crate_gpt, crate_mae
from .models.family import Family
from .released import RELEASED

FAMILIES: dict[str, Family] = {}
_BY_NAME: dict[str, Family] = {}          # preset name -> its family


def register_family(family: Family) -> Family:
    """Add a family (its presets become create_model names). Returns it. Raises ValueError when its name
    or one of its presets is taken."""
    if family.name in FAMILIES:
        raise ValueError(f"a model family named {family.name!r} is already registered")
    taken = sorted(set(family.presets) & (set(_BY_NAME) | set(RELEASED)))
    if taken:
        raise ValueError(f"preset names already taken: {', '.join(taken)}")
    FAMILIES[family.name] = family
    _BY_NAME.update(dict.fromkeys(family.presets, family))
    return family


for _family in (crate.FAMILY, crate_alpha.FAMILY, crate_mae.FAMILY, crate_mae.CLASSIFIER_FAMILY,
                crate_gpt.FAMILY):
    register_family(_family)


def list_models(family: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`, of one family or of all (the released files' model names,
    crate_fast.RELEASED, are accepted too)."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; available: {', '.join(FAMILIES)}")
    return sorted(n for n, f in _BY_NAME.items() if family is None or f.name == family)


def family_of(name: str) -> Family:
    """The family a preset (or a released file's model) name belongs to. Raises ValueError (with close
    matches) for unknown names."""
    if name in RELEASED:
        name = RELEASED[name].arch
    if name not in _BY_NAME:
        close = difflib.get_close_matches(name, _BY_NAME, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}.{hint}")
    return _BY_NAME[name]


def family_of_config(cfg) -> Family:
    """The family whose config class is exactly type(cfg) (a family's config may extend another's:
    CRATEAlphaConfig is a CRATEConfig). Raises TypeError for a config of no registered family."""
    for f in FAMILIES.values():
        if type(cfg) is f.config_class:
            return f
    raise TypeError(f"{type(cfg).__name__} is not the config of a registered model family")


def get_config(name: str, **overrides):
    """The config of a preset (or of a known released file's model, crate_fast.RELEASED), with any field
    overridden. Raises ValueError for an unknown name or an invalid value, TypeError for a field the
    family does not have."""
    if name in RELEASED:
        name, overrides = RELEASED[name].arch, {**RELEASED[name].overrides, **overrides}
    fam = family_of(name)
    fields = {**fam.presets[name], **overrides}
    known = fam.config_class.__dataclass_fields__
    unknown = set(fields) - set(known)
    if unknown:
        raise TypeError(f"unknown {fam.title} option(s) {sorted(unknown)}; valid: {sorted(known)}")
    return fam.config_class(**fields)


def create_model(name: str, **overrides) -> nn.Module:
    """Build a model by preset name; keywords override any field of its config.

    >>> model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4, impl="auto")
    >>> model = create_model("crate_base_demo")     # the model a known released file needs (RELEASED)

    ``impl`` (every family) selects the MSSA/ISTA/ODL math: "reference" (the literal official code),
    "torch" (fast PyTorch with custom backward passes, any device), "triton" (fused kernels) or "auto"
    (triton for CUDA inputs the kernels take, torch elsewhere). Defaults are the family's: CRATE
    classifiers are 224 px, patch 16, 1000 classes. Raises as :func:`get_config`.
    """
    cfg = get_config(name, **overrides)
    return family_of_config(cfg).model_class(cfg)
