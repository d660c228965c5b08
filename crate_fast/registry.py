"""Named presets and ``create_model``: the front door users and train.py share."""
from __future__ import annotations

import difflib

from .config import CRATEConfig, Size
from .model import CRATE

# Official presets (model/crate.py, CRATE paper Table 1). dim_head = dim // heads: 64, 48 (!), 64, 64.
_PRESETS: dict[str, dict] = {
    "crate_tiny": dict(dim=384, depth=12, heads=6),
    "crate_small": dict(dim=576, depth=12, heads=12),
    "crate_base": dict(dim=768, depth=12, heads=12),
    "crate_large": dict(dim=1024, depth=24, heads=16),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_PRESETS)


def get_config(name: str, **overrides) -> CRATEConfig:
    """The :class:`CRATEConfig` of a preset, with any field overridden."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, _PRESETS, n=2)
        hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}.{hint}")
    fields = {**_PRESETS[name], **overrides}
    unknown = set(fields) - set(CRATEConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown CRATE option(s) {sorted(unknown)}; valid: "
                        f"{sorted(CRATEConfig.__dataclass_fields__)}")
    return CRATEConfig(**fields)


def create_model(name: str, *, num_classes: int = 1000, img_size: Size = 224, patch_size: Size = 16,
                 impl: str = "auto", **overrides) -> CRATE:
    """Build a CRATE classifier by preset name.

    >>> model = create_model("crate_small", num_classes=10, img_size=32, patch_size=4)

    ``impl`` selects the MSSA/ISTA math: "reference" (the literal official code), "torch" (fast PyTorch
    with custom backward passes, any device), "triton" (fused CUDA kernels) or "auto" (triton on CUDA
    tensors, torch elsewhere). Any other :class:`CRATEConfig` field can be overridden by keyword.
    """
    cfg = get_config(name, num_classes=num_classes, img_size=img_size, patch_size=patch_size,
                     impl=impl, **overrides)
    return CRATE(cfg)
