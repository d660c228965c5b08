"""White-box analysis of CRATE: per-layer compression and sparsity, attention maps, PCA features.

>>> from crate_fast.analysis import layer_stats, attention_maps, patch_features, foreground_mask, pca_rgb
>>> stats = layer_stats(model, images)                 # one dict per layer: coding_rate, sparsity, ...
>>> maps = attention_maps(model, images, layer=-1, heads=[0, 2])   # (B, 2, H/patch, W/patch)
>>> feats = patch_features(model, images)              # (B, H/patch, W/patch, heads * dim_head)
>>> rgb = pca_rgb(feats, foreground_mask(feats))       # the notebooks' two-stage PCA, background black
Off the training resolution the position table is resized as the CRATE notebooks do (DINO's
interpolate_pos_encoding, pos_interp="dino"); pos_interp="size" is what the model's forward uses.
Command line (writes PNGs and stats.json): python -m crate_fast.analyze --ckpt RUN_DIR/best.pt --out DIR
"""
from .attention import attention_maps, check_heads, check_layer, patch_features, threshold_masks
from .pca import foreground_mask, pca_rgb
from .stats import coding_rate, expansion_rate, layer_stats, zero_fraction

__all__ = ["attention_maps", "check_heads", "check_layer", "coding_rate", "expansion_rate", "foreground_mask",
           "layer_stats", "patch_features", "pca_rgb", "threshold_masks", "zero_fraction"]
