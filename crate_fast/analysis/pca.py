"""The CRATE authors' two-stage PCA of patch features: a foreground mask, then colours of the foreground.

Source: Ma-Lab-Berkeley/CRATE vis_utils/pca_visualization.py and LeslieTrue/crate-emergence-notebooks
pca_visualization.py (both after ShirAmir/dino-vit-features pca.py); the notebooks run them as
  1. `pca(..., n_components=1, all_together=True)`: one PCA fitted on the patches of all images together;
  2. `plot_pca_mask`: per image, the component min-max scaled to [0, 1], `> th` (th = 0.5 in
     Ma-Lab-Berkeley/CRATE, 0.4 in the emergence notebooks' script), then `scipy.ndimage.binary_fill_holes`;
  3. `pca(..., n_components=3, masks=masks)`: a second PCA fitted on the foreground patches of all images;
     per image the background is set to (the image's lowest score, 0 included) - 1;
  4. `plot_pca`: each of the 3 components min-max scaled per image, shown as RGB (background black).
Signs: a principal direction's sign is arbitrary; scikit-learn's PCA of the notebooks' time (< 1.5, via
`svd_flip(u_based_decision=True)`) made each component's largest-magnitude score positive, and so do we,
so "foreground" is the side of the first component that holds its most extreme patch.
"""
from __future__ import annotations

import torch


def _check_features(features: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a (B, h, w, C) tensor, got {shape}")
    if not features.is_floating_point():
        raise TypeError(f"features must be floating point, got {features.dtype}")
    if features.numel() == 0:
        raise ValueError(f"features are empty: {tuple(features.shape)}")


def _pca_scores(x: torch.Tensor, k: int) -> torch.Tensor:
    """Scores of (n, C) rows on their first k principal directions (rows centred by their mean), float64.

    Each component's sign makes its largest-|score| row positive (first such row on ties); components
    beyond the rank of the data are zeros. Returns (n, k)."""
    x = x.double()
    x = x - x.mean(0)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    scores = x @ vh[:k].T
    top = scores.abs().argmax(0)                                           # first maximum on ties
    signs = torch.sign(scores[top, torch.arange(scores.shape[1], device=x.device)])
    scores = scores * torch.where(signs == 0, torch.ones_like(signs), signs)
    if scores.shape[1] < k:
        scores = torch.cat([scores, scores.new_zeros(scores.shape[0], k - scores.shape[1])], dim=1)
    return scores


def _fill_holes(mask: torch.Tensor) -> torch.Tensor:
    from scipy.ndimage import binary_fill_holes

    filled = [torch.from_numpy(binary_fill_holes(m.numpy())) for m in mask.cpu()]
    return torch.stack(filled).to(mask.device)


def foreground_mask(features: torch.Tensor, threshold: float = 0.5, fill_holes: bool = True) -> torch.Tensor:
    """The notebooks' foreground: the first principal component of the patch features, thresholded.

    features: (B, h, w, C) float (e.g. patch_features). One PCA (1 component, float64) is fitted on all
    B * h * w patches together; per image its scores are min-max scaled to [0, 1] and a patch is foreground
    where the scaled score is > threshold; holes are then filled per image (scipy.ndimage.binary_fill_holes,
    its default 4-connected structure) unless fill_holes is False. The component's sign: its
    largest-magnitude score is positive (see the module docstring). An image whose scores are all equal
    gets no foreground.
    Returns bool (B, h, w) on the features' device.
    Raises ValueError for a non-(B, h, w, C) input or a threshold outside [0, 1), TypeError for a
    non-float input.
    Source: `plot_pca_mask` in Ma-Lab-Berkeley/CRATE vis_utils/pca_visualization.py (th = 0.5, our default)
    and LeslieTrue/crate-emergence-notebooks pca_visualization.py (threshold 0.4)."""
    _check_features(features)
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    B, h, w, C = features.shape
    pc1 = _pca_scores(features.reshape(-1, C), 1).reshape(B, h * w)
    lo, hi = pc1.min(1, keepdim=True).values, pc1.max(1, keepdim=True).values
    scaled = (pc1 - lo) / (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
    mask = (scaled > threshold).reshape(B, h, w)
    return _fill_holes(mask) if fill_holes else mask


def pca_rgb(features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Three principal components of patch features as RGB, fitted on the (foreground) patches of all images.

    features: (B, h, w, C) float. mask: None (every patch) or bool (B, h, w), e.g. foreground_mask(features).
    One PCA (3 components, float64, signs as in the module docstring; components beyond the data's rank
    are zero) is fitted on the selected patches of all images together. Per image, as the notebooks'
    `pca` + `plot_pca`: unselected patches get the value (lowest score of the image over its 3 components
    and 0) - 1, then each component is min-max scaled over the image's patches. So the background is black
    (0, 0, 0), no selected patch is, and with mask=None this is a plain per-image, per-component min-max.
    An image with no selected patch is all black.
    Returns float32 (B, h, w, 3) in [0, 1] on the features' device.
    Raises ValueError for a non-(B, h, w, C) input, a mask of another shape or one selecting no patch,
    TypeError for a non-float input or a non-bool mask.
    Source: `pca(..., n_components=3, masks=...)` and `plot_pca` in Ma-Lab-Berkeley/CRATE
    vis_utils/pca_visualization.py (the same code as LeslieTrue/crate-emergence-notebooks pca_visualization.py)."""
    _check_features(features)
    B, h, w, C = features.shape
    if mask is None:
        mask = torch.ones(B, h, w, dtype=torch.bool, device=features.device)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (B, h, w):
        raise ValueError(f"mask must have shape {(B, h, w)}, got {tuple(mask.shape)}")
    sel = mask.reshape(B, h * w).to(features.device)
    if not sel.any():
        raise ValueError("mask selects no patch: nothing to fit the PCA on")
    x = features.reshape(B, h * w, C)
    full = torch.zeros(B, h * w, 3, dtype=torch.float64, device=features.device)
    full[sel] = _pca_scores(x[sel], 3)
    background = full.flatten(1).min(1).values - 1                    # per image, 0 included
    full = torch.where(sel[..., None], full, background[:, None, None])
    lo, hi = full.min(1, keepdim=True).values, full.max(1, keepdim=True).values
    rgb = (full - lo) / (hi - lo).clamp_min(torch.finfo(torch.float64).tiny)
    return rgb.reshape(B, h, w, 3).float()
