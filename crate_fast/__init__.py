"""crate-fast: the fastest faithful CRATE family (white-box transformers) in PyTorch + Triton.

>>> import crate_fast
>>> model = crate_fast.create_model("crate_base", impl="auto")      # triton on CUDA, torch elsewhere
>>> crate_fast.load_official_state_dict(model, "CRATE_base.pth")     # official checkpoints, strict, safe
"""
from . import layers
from .checkpoint import load_official_state_dict, load_weights, read_checkpoint, save_weights, to_official_state_dict
from .kernels import IMPLS
from .models import CRATE, CRATEMAE, CRATEAlpha, CRATEAlphaConfig, CRATEConfig, CRATEMAEConfig
from .registry import FAMILIES, create_model, get_config, list_models
from .released import RELEASED, load_released
from .timm_models import register as _register_with_timm

_register_with_timm()          # timm.create_model("crate_base") etc. when timm is installed (optional)

__version__ = "0.1.0"
__all__ = ["CRATE", "CRATEAlpha", "CRATEAlphaConfig", "CRATEConfig", "CRATEMAE", "CRATEMAEConfig", "FAMILIES", "IMPLS",
           "RELEASED", "create_model", "get_config", "layers",
           "list_models", "load_official_state_dict", "load_released", "load_weights", "read_checkpoint",
           "save_weights", "to_official_state_dict"]
