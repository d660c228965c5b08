"""Model families, one file each, built from the shared blocks of crate_fast.layers:

- :mod:`crate_fast.models.crate`: the CRATE classifier (Yu et al., NeurIPS 2023).

crate_fast.registry lists every family's presets; docs/DESIGN.md §7 says how to add a family.
"""
from .crate import CRATE, CRATEConfig

__all__ = ["CRATE", "CRATEConfig"]
