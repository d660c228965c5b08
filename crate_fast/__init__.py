"""crate-fast: the fastest faithful CRATE family (white-box transformers) in PyTorch + Triton.

>>> import crate_fast
>>> model = crate_fast.create_model("crate_small", impl="auto")      # triton on CUDA, torch elsewhere
>>> crate_fast.load_official_state_dict(model, "CRATE_small.pth")    # official checkpoints, strict, safe
>>> model = crate_fast.load_released("crate_alpha_B16.pth")          # a known released file, its model built
>>> model = crate_fast.load_model("runs/digits/model.safetensors")   # crate-fast's own files record their model
>>> model = crate_fast.create_model("crate_alpha_base", pretrained=True)   # from the Hugging Face Hub
>>> model = crate_fast.from_pretrained("runs/digits")                # a save_pretrained folder, run or Hub repo

Layers, from the bottom: crate_fast.kernels (the operators), crate_fast.io (files), layers and models/
(the families, each one bundle: models/family.py), registry (the plain builder), checkpoint (loading), then
the tools above them: hub (create_model with pretrained weights, from_pretrained), timm_models, flops,
probe, analysis/, training/ (docs/DESIGN.md §1).
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
from .hub import create_model, from_pretrained
from .io import read_checkpoint
from .kernels import IMPLS
from .models import CRATE, CRATEGPT, CRATEMAE, CRATEAlpha, CRATEAlphaConfig, CRATEConfig, CRATEGPTConfig, CRATEMAEConfig
from .registry import FAMILIES, get_config, list_models
from .released import RELEASED
from .timm_models import register as _register_with_timm

_register_with_timm()          # timm.create_model("crate_base") etc. when timm is installed (optional)

__version__ = "0.1.0"
__all__ = ["CRATE", "CRATEAlpha", "CRATEAlphaConfig", "CRATEConfig", "CRATEGPT", "CRATEGPTConfig", "CRATEMAE",
           "CRATEMAEConfig", "FAMILIES", "IMPLS", "RELEASED", "create_model", "from_pretrained", "get_config",
           "identify", "layers", "list_models", "load_model", "load_official_state_dict", "load_released",
           "load_weights", "read_checkpoint", "save_weights", "to_official_state_dict"]
