"""Model families, one file each, built from the shared blocks of crate_fast.layers:

- :mod:`crate_fast.models.crate`: the CRATE classifier (Yu et al., NeurIPS 2023).
- :mod:`crate_fast.models.crate_alpha`: CRATE-alpha, the scaled classifier (Yang et al., NeurIPS 2024).
- :mod:`crate_fast.models.crate_mae`: CRATE-MAE, the white-box masked autoencoder (Pai et al., ICLR 2024),
  and its encoder as a classifier for fine-tuning.
- :mod:`crate_fast.models.crate_gpt`: CRATE-GPT, the white-box causal language model (crate-lm; the CRATE
  book, ch. 7), with KV-cached generation.
- :mod:`crate_fast.models.base`: what every model shares (CRATEModel) and what the classifiers share
  (TokenClassifier: pooling, head, timm's model contract).
- :mod:`crate_fast.models.family`: the bundle each family file declares (``FAMILY``);
  :mod:`crate_fast.models.keys`: official key layouts; ``_config``, ``_flops``: what the configs and FLOP
  counts share.

crate_fast.registry collects the families; docs/DESIGN.md §7 says how to add one.
"""
from .crate import CRATE, CRATEConfig
from .crate_alpha import CRATEAlpha, CRATEAlphaConfig
from .crate_gpt import CRATEGPT, CRATEGPTConfig
from .crate_mae import CRATEMAE, CRATEMAEClassifier, CRATEMAEClassifierConfig, CRATEMAEConfig

__all__ = ["CRATE", "CRATEAlpha", "CRATEAlphaConfig", "CRATEConfig", "CRATEGPT", "CRATEGPTConfig", "CRATEMAE",
           "CRATEMAEClassifier", "CRATEMAEClassifierConfig", "CRATEMAEConfig"]
