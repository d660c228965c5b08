"""Named presets of every model family and ``create_model``: the front door users and train.py share."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from .models import crate, crate_alpha, crate_mae


@dataclass(frozen=True)
class Family:
    """One model family: its config and model classes, its named presets, and where it comes from."""

    name: str
    title: str
    config_class: type
    model_class: type
    presets: dict[str, dict]
    paper: str


FAMILIES: dict[str, Family] = {f.name: f for f in [
    Family("crate", "CRATE", crate.CRATEConfig, crate.CRATE, crate.PRESETS,
           "Yu et al., White-Box Transformers via Sparse Rate Reduction, NeurIPS 2023"),
    Family("crate_alpha", "CRATE-alpha", crate_alpha.CRATEAlphaConfig, crate_alpha.CRATEAlpha, crate_alpha.PRESETS,
           "Yang et al., Scaling White-Box Transformers for Vision, NeurIPS 2024"),
    Family("crate_mae", "CRATE-MAE", crate_mae.CRATEMAEConfig, crate_mae.CRATEMAE, crate_mae.PRESETS,
           "Pai et al., Masked Autoencoding via Structured Diffusion with White-Box Transformers, ICLR 2024"),
    Family("crate_mae_cls", "CRATE-MAE classifier", crate_mae.CRATEMAEClassifierConfig, crate_mae.CRATEMAEClassifier,
           crate_mae.CLASSIFIER_PRESETS, "a CRATE-MAE encoder fine-tuned with a linear head (Pai et al., ICLR 2024)"),
]}
_BY_NAME: dict[str, Family] = {name: f for f in FAMILIES.values() for name in f.presets}


def list_models(family: str | None = None) -> list[str]:
    """Names accepted by :func:`create_model`, of one family or of all."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; available: {', '.join(FAMILIES)}")
    return sorted(n for n, f in _BY_NAME.items() if family is None or f.name == family)


def family_of(name: str) -> Family:
    """The family a preset name belongs to. Raises ValueError (with close matches) for unknown names."""
    if name not in _BY_NAME:
        close = difflib.get_close_matches(name, _BY_NAME, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}.{hint}")
    return _BY_NAME[name]


def get_config(name: str, **overrides):
    """The config of a preset (or of a known released file's model, crate_fast.released), with any field
    overridden. Raises ValueError for an unknown name or an invalid value, TypeError for a field the
    family does not have."""
    from .released import released_config_overrides

    released = released_config_overrides(name)
    if released is not None:
        name, overrides = released[0], {**released[1], **overrides}
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

    ``impl`` (every family) selects the MSSA/ISTA math: "reference" (the literal official code), "torch"
    (fast PyTorch with custom backward passes, any device), "triton" (fused kernels) or "auto" (triton
    for CUDA inputs the kernels take, torch elsewhere). Defaults are the family's: CRATE classifiers
    are 224 px, patch 16, 1000 classes.
    """
    cfg = get_config(name, **overrides)
    # exact type: a family's config may extend another's (CRATEAlphaConfig is a CRATEConfig)
    return next(f for f in FAMILIES.values() if type(cfg) is f.config_class).model_class(cfg)
