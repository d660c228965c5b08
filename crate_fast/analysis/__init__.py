"""White-box analysis of CRATE: per-layer compression and sparsity, attention maps, PCA features.

>>> from crate_fast.analysis import layer_stats, attention_maps
>>> stats = layer_stats(model, images)           # one dict per layer: coding_rate, sparsity, ...
>>> maps = attention_maps(model, images)         # (B, heads, H/patch, W/patch), last layer
Command line (writes PNGs and stats.json): python -m crate_fast.analyze --ckpt RUN_DIR/best.pt --out DIR
"""
from .attention import attention_maps, patch_features, pca_rgb, threshold_masks
from .stats import coding_rate, expansion_rate, layer_stats, zero_fraction

__all__ = ["attention_maps", "coding_rate", "expansion_rate", "layer_stats", "patch_features", "pca_rgb",
           "threshold_masks", "zero_fraction"]
