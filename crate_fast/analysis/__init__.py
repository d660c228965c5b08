"""White-box analysis of the CRATE family: per-layer compression and sparsity, attention maps, PCA features,
CRATE-MAE reconstructions.

>>> from crate_fast.analysis import layer_stats, attention_maps, patch_features, foreground_mask, pca_rgb
>>> stats = layer_stats(model, images)                 # one dict per layer: coding_rate, sparsity, ...
>>> maps = attention_maps(model, images, layer=-1, heads=[0, 2])   # (B, 2, H/patch, W/patch)
>>> feats = patch_features(model, images)              # (B, H/patch, W/patch, heads * dim_head)
>>> rgb = pca_rgb(feats, foreground_mask(feats))       # the notebooks' two-stage PCA, background black
>>> rec = mae_reconstruction(mae_model, images, seed=0)   # FAIR's demo: masked / reconstruction / pasted
>>> stats = layer_stats(gpt, idx)                      # a language model on a text: (B, T) token ids
>>> att = token_attention(gpt, idx, layer=-1)          # (B, heads, T, T) causal attention
Every function takes CRATE, CRATE-alpha and CRATE-MAE models (CRATE-MAE: its encoder on the whole image;
tokens.py says what each family's layers are read at). Off the training resolution the position table is
resized as the CRATE notebooks do (DINO's interpolate_pos_encoding, pos_interp="dino"); pos_interp="size"
is what the classifiers' forward uses.
Command line (writes PNGs and stats.json): python -m crate_fast.analyze --ckpt RUN_DIR/best.pt --out DIR
"""
from .attention import attention_maps, check_heads, check_layer, patch_features, threshold_masks, token_attention
from .pca import foreground_mask, pca_rgb
from .reconstruction import mae_reconstruction
from .stats import coding_rate, expansion_rate, layer_stats, zero_fraction
from .tokens import check_pos_interp, embed_tokens, sparse_code_name

__all__ = ["attention_maps", "check_heads", "check_layer", "check_pos_interp", "coding_rate", "embed_tokens",
           "expansion_rate", "foreground_mask", "layer_stats", "mae_reconstruction", "patch_features", "pca_rgb",
           "sparse_code_name", "threshold_masks", "token_attention", "zero_fraction"]
