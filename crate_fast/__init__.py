"""crate-fast: the fastest faithful CRATE (Coding RAte reduction TransformEr, Yu et al. NeurIPS 2023).

>>> import crate_fast
>>> model = crate_fast.create_model("crate_base", impl="auto")      # triton on CUDA, torch elsewhere
>>> crate_fast.load_official_state_dict(model, "CRATE_base.pth")     # official checkpoints, strict
"""
from . import layers
from .checkpoint import load_official_state_dict, to_official_state_dict
from .config import CRATEConfig
from .model import CRATE
from .registry import create_model, get_config, list_models

__version__ = "0.1.0"
__all__ = ["CRATE", "CRATEConfig", "create_model", "get_config", "list_models", "layers",
           "load_official_state_dict", "to_official_state_dict"]
