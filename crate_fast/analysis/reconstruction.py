"""What a CRATE-MAE makes of a masked image, as FAIR MAE's visualization demo shows it.

Source: facebookresearch/mae demo/mae_visualize.ipynb, ``run_one_image``: run the model at a mask ratio,
unpatchify the prediction, and show four pictures: the original, the masked input ``x * (1 - mask)``,
the reconstruction ``y`` and the reconstruction with the visible patches pasted back
``x * (1 - mask) + y * mask``. The demo loads a checkpoint trained on raw pixels. A model trained with
norm_pix_loss predicts each masked patch standardized by its own mean and variance; its prediction is
mapped back to pixels with the *target* patch's mean and variance, as the MAE reimplementations that
visualize such models do (pengzhiliang/MAE-pytorch run_mae_vis.py, MCG-NJU/VideoMAE run_videomae_vis.py:
"we add the predict and the original mean and var of each patch"; they standardize each channel of a
patch, FAIR and CRATE-MAE the whole patch vector, so here it is the exact inverse of forward_loss's
standardization: pred * sqrt(var + 1e-6) + mean, unbiased var over the patch). That borrows two numbers
per masked patch the encoder never saw (its brightness and contrast): such a picture shows the structure
predicted inside each patch, not a pure prediction.
"""
from __future__ import annotations

import torch

from ..models.crate_mae import CRATEMAE
from .tokens import float_model


@torch.no_grad()
def mae_reconstruction(model: CRATEMAE, images: torch.Tensor, mask_ratio: float | None = None,
                       seed: int = 0) -> dict:
    """FAIR's four pictures (module docstring) of a batch, under a reproducible mask.

    model: a CRATEMAE; it runs in fp32 in eval mode (a 16-bit model is copied) and its mode is restored.
    images: (B, in_chans, H, W) float at the config's img_size, in the units the model was trained on
    (ImageNet-normalized pixels for crate_fast's loaders). mask_ratio: None for the config's. seed: the
    masking noise is torch.rand(B, L) from a CPU generator seeded with it, so a seed gives the same masks
    on any device.
    Returns {"original", "masked", "reconstruction", "pasted"}: (B, in_chans, H, W) fp32 tensors in the
    images' units on the model's device (the reconstruction de-normalized per patch under norm_pix_loss,
    see the module docstring); "mask": (B, L) fp32, 1 on removed patches; "loss": the model's loss on
    these masks (a float, the mean over the removed patches).
    Raises TypeError for another model, ValueError for another image size or channel count or a
    mask_ratio outside [0, 1) (the model's checks)."""
    if not isinstance(model, CRATEMAE):
        raise TypeError(f"reconstructions need a CRATE-MAE model, got {type(model).__name__}")
    model = float_model(model)
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        x = images.to(device, torch.float32)
        noise = torch.rand(x.shape[0], model.config.num_patches, generator=torch.Generator().manual_seed(seed))
        with torch.autocast(device.type, enabled=False):
            loss, pred, mask = model(x, mask_ratio=mask_ratio, noise=noise.to(device))
        if model.config.norm_pix_loss:
            target = model.patchify(x)        # forward_loss's statistics: mean and unbiased variance per patch
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
        y = model.unpatchify(pred)
        pixel_mask = model.unpatchify(mask[..., None].expand(-1, -1, pred.shape[-1]))   # 1: removed
        masked = x * (1 - pixel_mask)
        return {"original": x, "masked": masked, "reconstruction": y, "pasted": masked + y * pixel_mask,
                "mask": mask, "loss": float(loss)}
    finally:
        model.train(was_training)
