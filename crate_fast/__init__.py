"""crate-fast: the fastest faithful CRATE family (white-box transformers) in PyTorch + Triton.

>>> import crate_fast
>>> model = crate_fast.create_model("crate_small", impl="auto")      # triton on CUDA, torch elsewhere
>>> crate_fast.load_official_state_dict(model, "CRATE_small.pth")    # official checkpoints, strict, safe
>>> model = crate_fast.load_released("crate_alpha_B16.pth")          # a known released file, its model built
>>> model = crate_fast.load_model("runs/digits/model.safetensors")   # crate-fast's own files record their model

Layers, from the bottom: crate_fast.kernels (the operators), crate_fast.io (files), layers and models/
(the families, each one bundle: models/family.py), registry (create_model), checkpoint (loading), then
the tools above them: timm_models, flops, probe, analysis/, training/ (docs/DESIGN.md §1).
"""
from . import layers
from .checkpoint import (
    identify,
    load_model,
    load_official_state_dict,
    load_released,
    load_weights,
    save_weights,
    to_official_state_dict,
)
from .io import read_checkpoint
from .kernels import IMPLS
from .models import CRATE, CRATEMAE, CRATEAlpha, CRATEAlphaConfig, CRATEConfig, CRATEMAEConfig
from .registry import FAMILIES, create_model, get_config, list_models
from .released import RELEASED
from .timm_models import register as _register_with_timm

_register_with_timm()          # timm.create_model("crate_base") etc. when timm is installed (optional)

__version__ = "0.1.0"
__all__ = ["CRATE", "CRATEAlpha", "CRATEAlphaConfig", "CRATEConfig", "CRATEMAE", "CRATEMAEConfig", "FAMILIES", "IMPLS",
           "RELEASED", "create_model", "get_config", "identify", "layers", "list_models", "load_model",
           "load_official_state_dict", "load_released", "load_weights", "read_checkpoint", "save_weights",
           "to_official_state_dict"]
