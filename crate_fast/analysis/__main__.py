"""Pictures and numbers of what a CRATE-family model does, layer by layer (CRATE, CRATE-alpha, CRATE-MAE).

    python -m crate_fast.analyze --ckpt RUN_DIR/best.pt --out DIR [--images a.jpg b.png ...]
    python -m crate_fast.analyze --ckpt CRATE_small.pth --arch crate_small --out DIR      # official weights
    python -m crate_fast.analyze --ckpt crate-mae-base-lmd0.5-checkpoint-799.pth --arch mae_crate_base --out DIR

A train.py run checkpoint of any family records its model; other weights (an official file of the --arch
family, a bare state_dict, model.safetensors) need --arch and, if not 224 / 16, --img-size / --patch-size.
Writes into DIR: stats.json (per-layer coding rate R^c, expansion R, sparsity, means and stds),
coding_rate.png and sparsity.png (curves over depth with error bars; sparsity counts the zeros of the ISTA
output, for CRATE-alpha of the ODL codes a2; CRATE-MAE: its encoder's layers), attention_<i>.png (the CLS
token's attention of each head over image i at --layer, for the heads in --heads, default all),
masks_<i>.png (DINO-style masks keeping a fraction tau of each head's attention) and pca.png (the CRATE
notebooks' two-stage PCA of the patch features: the first component thresholded at --fg-threshold into a
foreground mask with holes filled, then 3 components of a PCA of the foreground patches as RGB, background
black). At a --size other than the training size the position table is resized as the notebooks do
(DINO's interpolate_pos_encoding; --pos-interp size: as the model's forward). Without --images it uses
scikit-image's bundled photographs; ``--images digits`` takes images of the embedded digits validation
set (what the README's main job trains on). For CRATE-MAE also reconstruction.png: FAIR MAE's demo grid
(rows: original, masked input, reconstruction, reconstruction with the visible patches pasted back) at
--mask-ratio (default the model's) under masks drawn from --seed, at the model's image size
(crate_fast.analysis.mae_reconstruction; under norm_pix_loss the prediction is de-normalized with each
target patch's mean and variance).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import numpy as np
import torch

from ..checkpoint import load_model
from ..data import text
from ..io import read_weights
from ..progress import Progress
from ..registry import family_of_config
from .attention import attention_maps, check_heads, check_layer, patch_features, threshold_masks
from .images import load_images
from .pca import foreground_mask, pca_rgb
from .plots import plot_curve, plot_heads, plot_pca, plot_reconstruction
from .reconstruction import mae_reconstruction
from .stats import layer_stats
from .text import analyze_text
from .tokens import check_pos_interp, reads_tokens, sparse_code_name


def _is_mae(model) -> bool:
    return family_of_config(model.config).objective == "masked_autoencoding"


def check_options(model, *, layer: int = -1, heads: list[int] | None = None, tau: float = 0.6,
                  pos_interp: str = "dino", fg_threshold: float = 0.5, mask_ratio: float | None = None,
                  cli: bool = False) -> tuple[int, list[int], float | None]:
    """The analysis options, checked for this model before any work: (layer, heads, mask_ratio) resolved
    (mask_ratio: the model's for a CRATE-MAE when None, None for a classifier). Messages name the CLI's
    flags when cli=True. Raises ValueError / TypeError for a bad layer, head, tau, pos_interp,
    fg_threshold or mask_ratio, or a mask_ratio for a classifier."""
    name = (lambda n: "--" + n.replace("_", "-")) if cli else (lambda n: n)     # noqa: E731
    layer, heads = check_layer(model, layer), check_heads(model, heads)
    if not 0 < tau <= 1:
        raise ValueError(f"{name('tau')} must be in (0, 1], got {tau}")
    if not 0 <= fg_threshold < 1:
        raise ValueError(f"{name('fg_threshold')} must be in [0, 1), got {fg_threshold}")
    check_pos_interp(pos_interp)
    if not _is_mae(model):
        if mask_ratio is not None:
            raise ValueError(f"{name('mask_ratio')} is for CRATE-MAE models, not {type(model).__name__}")
        return layer, heads, None
    mask_ratio = model.config.mask_ratio if mask_ratio is None else mask_ratio
    if not 0 < mask_ratio < 1:        # 0 leaves no patch to predict (the loss is 0 / 0); the model refuses 1
        raise ValueError(f"{name('mask_ratio')} must be in (0, 1), got {mask_ratio}")
    return layer, heads, mask_ratio


def _write_maps(model, images, pictures, out, layer, heads, tau, pos_interp, steps) -> None:
    maps = attention_maps(model, images, layer, heads=heads, pos_interp=pos_interp)   # (B, len(heads), h, w)
    masks = threshold_masks(maps, tau)
    for i in range(len(images)):
        plot_heads(pictures[i], maps[i].cpu().numpy(), os.path.join(out, f"attention_{i}.png"),
                   f"CLS attention per head, layer {layer + 1}", labels=heads)
        plot_heads(pictures[i], masks[i].float().cpu().numpy(), os.path.join(out, f"masks_{i}.png"),
                   f"masks holding {tau:.0%} of each head's attention", cmap="viridis", labels=heads)
        steps.update(1)


def _write_reconstruction(model, images, out, mask_ratio, seed) -> dict:
    rec = mae_reconstruction(model, images, mask_ratio, seed)
    denorm = " (norm_pix_loss: each patch de-normalized with its target's mean and std)" \
        if model.config.norm_pix_loss else ""
    plot_reconstruction(rec, os.path.join(out, "reconstruction.png"),
                        f"mask ratio {mask_ratio:g}, seed {seed}, loss {rec['loss']:.4f}{denorm}")
    return {"mask_ratio": mask_ratio, "seed": seed, "loss": rec["loss"], "norm_pix_loss": model.config.norm_pix_loss,
            "num_images": int(images.shape[0])}


def analyze(model, images: torch.Tensor, pictures: np.ndarray, out: str, *, layer: int = -1,
            heads: list[int] | None = None, tau: float = 0.6, pos_interp: str = "dino", fg_threshold: float = 0.5,
            mask_ratio: float | None = None, seed: int = 0, recon_images: torch.Tensor | None = None,
            device: str = "cpu", progress: bool = True) -> dict:
    """Compute everything and write every file into `out` (the module docstring). Returns stats.json's content.

    model: CRATE, CRATE-alpha or CRATE-MAE (its encoder's layers; see crate_fast.analysis).
    images: (B, 3, H, W) ImageNet-normalized batch; pictures: (B, H, W, 3) uint8 for display. layer / heads:
    the attention maps' block and heads (check_layer / check_heads rules); pos_interp: how the position table
    is resized off the training grid ("dino" or "size"); fg_threshold: the foreground_mask threshold.
    CRATE-MAE only (reconstruction.png): mask_ratio in (0, 1) (None: the config's), seed of the masking
    noise, recon_images (B', 3, h, w) at the config's img_size (default: `images`, which must then be at
    that size). Raises what :func:`check_options` raises, ValueError for reconstruction images of another
    size or for recon_images with a classifier (all before any work)."""
    layer, heads, mask_ratio = check_options(model, layer=layer, heads=heads, tau=tau, pos_interp=pos_interp,
                                             fg_threshold=fg_threshold, mask_ratio=mask_ratio)
    mae = mask_ratio is not None
    recon_images = images if mae and recon_images is None else recon_images
    if recon_images is not None and (not mae or tuple(recon_images.shape[-2:]) != model.config.img_size):
        raise ValueError(f"recon_images are for CRATE-MAE models, at the model's size {model.config.img_size}; got "
                         f"{type(model).__name__} and {tuple(recon_images.shape[-2:])} (pass recon_images)")
    os.makedirs(out, exist_ok=True)
    model = model.to(device).eval()
    steps = Progress(4 + mae + len(images), "analyzing", every=1, enabled=progress)
    stats, codes = layer_stats(model, images, pos_interp=pos_interp), sparse_code_name(model)
    plot_curve(stats, "coding_rate", "coding rate $R^c$", os.path.join(out, "coding_rate.png"),
               "compression: $R^c$ of each layer's input")
    plot_curve(stats, "l0", "normalized $\\ell_0$ (1 - sparsity)", os.path.join(out, "sparsity.png"),
               f"sparsification: {codes} $\\ell_0$")
    steps.update(2)
    _write_maps(model, images, pictures, out, layer, heads, tau, pos_interp, steps)
    feats = patch_features(model, images, layer, pos_interp=pos_interp)
    fg = foreground_mask(feats, fg_threshold)
    plot_pca(pictures, fg.cpu().numpy(), pca_rgb(feats, fg).cpu().numpy(), os.path.join(out, "pca.png"), fg_threshold)
    steps.update(2)
    result = {"family": family_of_config(model.config).name, "layers": stats, "sparsity_of": codes,
              "num_images": len(images), "image_size": int(images.shape[-1]), "attention_layer": layer,
              "attention_heads": heads, "tau": tau, "pos_interp": pos_interp, "fg_threshold": fg_threshold,
              "foreground_fraction": fg.flatten(1).float().mean(1).tolist(), "config": model.config.to_dict()}
    if mae:
        result["reconstruction"] = _write_reconstruction(model, recon_images, out, mask_ratio, seed)
        steps.update(1)
    steps.close()
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m crate_fast.analyze", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="train.py checkpoint (best.pt / last.pt) or other weights")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--images", nargs="+", help="image files; 'digits' for the embedded data set")
    ap.add_argument("--text", help="language models (CRATE-GPT): the text to analyze")
    ap.add_argument("--arch", help="preset of weights that are not a run checkpoint (official files, state_dicts): "
                                   "crate_small, crate_alpha_base, mae_crate_base, ... (crate_fast.list_models())")
    ap.add_argument("--img-size", type=int, help="weights that do not record their model: training image size "
                                                 "(default: the preset's)")
    ap.add_argument("--patch-size", type=int, help="weights that do not record their model: patch size")
    ap.add_argument("--size", type=int, help="analysis image size (default: the model's)")
    ap.add_argument("--layer", type=int, default=-1, help="layer for attention maps and PCA (0-based; -1: last)")
    ap.add_argument("--heads", type=int, nargs="+", help="heads to draw (0-based, e.g. --heads 0 2 5; default all)")
    ap.add_argument("--tau", type=float, default=0.6, help="attention mass kept by the masks")
    ap.add_argument("--fg-threshold", type=float, default=0.5,
                    help="foreground: first principal component, min-max scaled per image, above this (0.5)")
    ap.add_argument("--pos-interp", choices=("dino", "size"), default="dino",
                    help="position table off the training size: 'dino' (the CRATE notebooks' DINO formula, "
                         "default) or 'size' (as the classifiers' forward)")
    ap.add_argument("--mask-ratio", type=float,
                    help="CRATE-MAE: fraction of patches masked in reconstruction.png (default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="CRATE-MAE: seed of the masks in reconstruction.png")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="allow a checkpoint whose loading runs code from the file (only for files you trust)")
    return ap


def _image_job(args, model):
    """The image analysis, its arguments checked: a function that runs it."""
    size = args.size or model.config.img_size[0]
    if size % model.config.patch_size[0]:
        raise ValueError(f"--size {size} is not divisible by the patch size {model.config.patch_size[0]}")
    layer, heads, mask_ratio = check_options(model, layer=args.layer, heads=args.heads, tau=args.tau,
                                             pos_interp=args.pos_interp, fg_threshold=args.fg_threshold,
                                             mask_ratio=args.mask_ratio, cli=True)
    images, pictures = load_images(args.images, size)
    recon_images = None
    if mask_ratio is not None and size != model.config.img_size[0]:   # the masked forward: the model's size
        recon_images = load_images(args.images, model.config.img_size[0])[0]
    return lambda: analyze(model, images, pictures, args.out, layer=layer, heads=heads, tau=args.tau,
                           pos_interp=args.pos_interp, fg_threshold=args.fg_threshold, mask_ratio=mask_ratio,
                           seed=args.seed, recon_images=recon_images, device=args.device)


def _text_job(args, model):
    """The analysis of a language model on --text (bytes for a 256-token vocabulary, else GPT-2 BPE)."""
    if not args.text:
        raise ValueError(f"{type(model).__name__} reads text: pass --text")
    tok = text.tokenizer("bytes" if model.config.vocab_size == 256 else "gpt2")
    ids = tok.encode(args.text)[: model.config.block_size]
    idx = torch.tensor([ids], device=args.device)
    labels = [tok.decode([i]) for i in ids]
    layer, heads = check_layer(model, args.layer), check_heads(model, args.heads)
    return lambda: analyze_text(model.to(args.device), idx, labels, args.out, layer=layer, heads=heads)


def main(argv=None) -> int:
    """The command line (see the module docstring). Returns 0, or 2 after printing `error: ...` for a
    missing or unreadable checkpoint or image, an unknown --arch, a --size not divisible by the patch, an
    out-of-range --layer / --heads / --tau / --fg-threshold / --mask-ratio, --mask-ratio for a classifier,
    or a language model without --text; nothing is written before the arguments are checked."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        weights = read_weights(args.ckpt, trusted=args.trust_checkpoint)
        model = load_model(weights, args.arch, args.img_size, args.patch_size)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a file, not a directory")
        job = _text_job(args, model) if reads_tokens(model) else _image_job(args, model)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if (weights.run_config or {}).get("data") == "digits" and args.images is None:
        print("note: this model was trained on digits; pass --images digits for in-distribution pictures")
    result = job()
    rc = [round(s["coding_rate"], 1) for s in result["layers"]]
    sp = [round(s["sparsity"], 3) for s in result["layers"]]
    rec = f"; reconstruction loss {result['reconstruction']['loss']:.4f}" if "reconstruction" in result else ""
    print(f"wrote {args.out}: coding rate per layer {rc}; sparsity per layer {sp}{rec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
