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
import os
import sys

import numpy as np
import torch

from . import create_model, list_models, load_weights
from .analysis import (
    attention_maps,
    check_heads,
    check_layer,
    check_pos_interp,
    foreground_mask,
    layer_stats,
    mae_reconstruction,
    patch_features,
    pca_rgb,
    sparse_code_name,
    threshold_masks,
)
from .checkpoint import read_checkpoint, unwrap_state_dict
from .models import CRATEMAE
from .progress import Progress
from .registry import FAMILIES, family_of

# scikit-image's bundled photographs (no download); stereo_motorcycle is a (left, right, disparity) triple,
# of which the left view is drawn (scikit-image 0.26 dropped the motorcycle_left alias).
PHOTOS = ["astronaut", "chelsea", "coffee", "stereo_motorcycle", "rocket", "hubble_deep_field"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# Model options a run checkpoint's config records (train.py TrainConfig) that change what an evaluation
# computes; each is passed when the --arch family's config has it (dropout and drop-path act only in training).
RUN_MODEL_FIELDS = ("pool", "mask_ratio", "norm_pix_loss")
# The same, read from a FAIR-style checkpoint's training arguments (the released CRATE-MAE file's 'args').
FAIR_ARGS_FIELDS = ("mask_ratio", "norm_pix_loss")


def load_model(path: str, arch: str | None, img_size: int, patch_size: int, *, trusted: bool = False):
    """(model, the --data it was trained on or None) from a train.py run checkpoint of any family (last.pt /
    best.pt record the arch, sizes and model options), or from other weights (an official file of the
    family, a bare state_dict, model.safetensors) given `arch` (any crate_fast preset) and the sizes.

    Classifiers (CRATE, CRATE-alpha) take their class count from the file's head; CRATE-MAE has none, and
    takes mask_ratio and norm_pix_loss from the run's config or a FAIR checkpoint's ``args`` (else the
    preset's). Files are read safely (crate_fast.read_checkpoint) and loaded strictly (load_weights).
    Raises FileNotFoundError, ValueError (no --arch for a file that is not a run checkpoint, an unknown
    arch, a classifier file without a head), RuntimeError (weights that do not fit; crate_fast.checkpoint's
    errors)."""
    obj = read_checkpoint(path, trusted=trusted)
    sd = unwrap_state_dict(obj)
    run = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    if run is not None:
        arch, img_size, patch_size = arch or run["arch"], run["img_size"], run["patch_size"]
        recorded = {k: run.get(k) for k in RUN_MODEL_FIELDS}
    elif arch is None:
        raise ValueError(f"{path!r} is not a train.py run checkpoint: pass --arch (one of {', '.join(list_models())}) "
                         "and, if not 224/16, --img-size/--patch-size")
    else:
        args = obj.get("args") if isinstance(obj, dict) else None
        recorded = {k: getattr(args, k, None) for k in FAIR_ARGS_FIELDS} if isinstance(args, argparse.Namespace) \
            else {}
    fields = family_of(arch).config_class.__dataclass_fields__
    overrides = {k: v for k, v in recorded.items() if k in fields and v is not None}
    if "num_classes" in fields:
        head = sd.get("head.weight", sd.get("mlp_head.1.weight"))
        if head is None:
            raise ValueError(f"{path!r} has no classifier weights (head.weight or mlp_head.1.weight)")
        overrides["num_classes"] = head.shape[0]
    model = create_model(arch, img_size=img_size, patch_size=patch_size, **overrides)
    load_weights(model, sd)
    return model, run.get("data") if run else None


def load_images(spec: list[str] | None, size: int) -> tuple[torch.Tensor, np.ndarray]:
    """(normalized fp32 batch (B, 3, size, size), uint8 pictures (B, size, size, 3) for display).

    spec: image paths, ["digits"] (6 images of the embedded digits validation set) or None (scikit-image's
    photographs). Each picture is resized to size x size (PIL bicubic) and normalized with ImageNet's mean
    and std, as the notebooks' preprocess does (they resize with LANCZOS). Raises ValueError for a file
    that cannot be read as an image."""
    from PIL import Image

    from .data import load_rgb

    if spec == ["digits"]:
        from .data.digits import digits_arrays

        arrays = digits_arrays()["val"][0][:6]
        pics = [Image.fromarray(a) for a in arrays]
    elif spec:
        pics = []
        for path in spec:
            try:
                pics.append(Image.fromarray(load_rgb(path)))      # upright, any PIL mode, 8-bit RGB
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read image {path!r}: {e}") from e
    else:
        from skimage import data as skd

        photos = [getattr(skd, name)() for name in PHOTOS]
        pics = [Image.fromarray(p[0] if isinstance(p, tuple) else p).convert("RGB") for p in photos]
    arr = np.stack([np.asarray(p.resize((size, size), Image.BICUBIC)) for p in pics])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, arr


def _plot_curve(stats: list[dict], key: str, ylabel: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, len(stats) + 1)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.errorbar(layers, [s[key] for s in stats], yerr=[s[key + "_std"] for s in stats], marker="o", capsize=3)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(layers)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def overlay(ax, picture: np.ndarray, heat: np.ndarray | None = None, cmap: str = "inferno") -> None:
    """Draw an (H, W, 3) picture and, over it, a (h, w) map stretched to the same pixel grid.

    Both images get the extent (0, W, H, 0): matplotlib's default extent for the picture is shifted by
    half a pixel from any explicit one, which left a strip of picture uncovered along the right and
    bottom edges of every map."""
    extent = (0, picture.shape[1], picture.shape[0], 0)
    ax.imshow(picture, extent=extent)
    if heat is not None:
        ax.imshow(heat, cmap=cmap, alpha=0.6, extent=extent, interpolation="nearest")


def _plot_heads(picture: np.ndarray, maps: np.ndarray, path: str, title: str, cmap: str = "inferno",
                labels: list[int] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = maps.shape[0]
    cols = min(heads + 1, 7)
    rows = int(np.ceil((heads + 1) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 1.9 * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    overlay(axes.flat[0], picture)
    axes.flat[0].set_title("input", fontsize=8)
    for h in range(heads):
        overlay(axes.flat[h + 1], picture, maps[h], cmap)
        axes.flat[h + 1].set_title(f"head {h if labels is None else labels[h]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_pca(pictures: np.ndarray, mask: np.ndarray, rgb: np.ndarray, path: str, threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(pictures)
    fig, axes = plt.subplots(3, n, figsize=(1.9 * n, 6), dpi=110, squeeze=False)
    for i in range(n):
        overlay(axes[0, i], pictures[i])
        overlay(axes[1, i], pictures[i], mask[i].astype(np.float32), cmap="gray")
        axes[2, i].imshow(rgb[i], interpolation="nearest")
        for ax in axes[:, i]:
            ax.axis("off")
    axes[0, 0].set_title("input", fontsize=8, loc="left")
    axes[1, 0].set_title(f"foreground: scaled PC1 > {threshold:g}", fontsize=8, loc="left")
    axes[2, 0].set_title("PCA of the foreground", fontsize=8, loc="left")
    fig.suptitle("patch features: foreground mask, then 3 principal components of the foreground as RGB",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _display(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) ImageNet-normalized pixels (what load_images makes) -> (H, W, 3) floats in [0, 1], clipped
    as FAIR's demo show_image does."""
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def _plot_reconstruction(rec: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("original", "original"), ("masked", "masked"), ("reconstruction", "reconstruction"),
            ("pasted", "reconstruction + visible")]
    n = rec["original"].shape[0]
    fig, axes = plt.subplots(len(rows), n, figsize=(1.9 * n, 2.0 * len(rows)), dpi=110, squeeze=False)
    for r, (key, label) in enumerate(rows):
        for i in range(n):
            axes[r, i].imshow(_display(rec[key][i]), interpolation="nearest")
            axes[r, i].axis("off")
        axes[r, 0].set_title(label, fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def family_name(model) -> str:
    """The registry name of a model's family ("crate", "crate_alpha", "crate_mae")."""
    return next(f.name for f in FAMILIES.values() if type(model.config) is f.config_class)


def analyze(model, images: torch.Tensor, pictures: np.ndarray, out: str, *, layer: int = -1,
            heads: list[int] | None = None, tau: float = 0.6, pos_interp: str = "dino", fg_threshold: float = 0.5,
            mask_ratio: float | None = None, seed: int = 0, recon_images: torch.Tensor | None = None,
            device: str = "cpu", progress: bool = True) -> dict:
    """Compute everything and write every file into `out`. Returns the stats.json content.

    model: CRATE, CRATE-alpha or CRATE-MAE (its encoder's layers; see crate_fast.analysis).
    images: (B, 3, H, W) ImageNet-normalized batch; pictures: (B, H, W, 3) uint8 for display. layer / heads:
    the attention maps' block and heads (check_layer / check_heads rules); pos_interp: how the position table
    is resized off the training grid ("dino" or "size"); fg_threshold: the foreground_mask threshold.
    CRATE-MAE only (reconstruction.png): mask_ratio in (0, 1) (None: the config's), seed of the masking
    noise, recon_images (B', 3, h, w) at the config's img_size (default: `images`, which must then be at
    that size).
    Raises ValueError / TypeError for a bad layer, head, tau, pos_interp, fg_threshold, mask_ratio or
    reconstruction image size, or mask_ratio for a classifier (all before any work)."""
    layer, heads = check_layer(model, layer), check_heads(model, heads)
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if not 0 <= fg_threshold < 1:
        raise ValueError(f"fg_threshold must be in [0, 1), got {fg_threshold}")
    check_pos_interp(pos_interp)
    mae = isinstance(model, CRATEMAE)
    if mae:
        mask_ratio = model.config.mask_ratio if mask_ratio is None else mask_ratio
        # 0 leaves no patch to predict (the loss is 0 / 0), and the model refuses 1.
        if not 0 < mask_ratio < 1:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        recon_images = images if recon_images is None else recon_images
        if tuple(recon_images.shape[-2:]) != model.config.img_size:
            raise ValueError(f"reconstructions need images at the model's size {model.config.img_size}, got "
                             f"{tuple(recon_images.shape[-2:])} (pass recon_images)")
    elif mask_ratio is not None or recon_images is not None:
        raise ValueError(f"mask_ratio and recon_images are for CRATE-MAE models, not {type(model).__name__}")
    os.makedirs(out, exist_ok=True)
    model = model.to(device).eval()
    steps = Progress(4 + mae + len(images), "analyzing", every=1, enabled=progress)
    stats = layer_stats(model, images, pos_interp=pos_interp)
    steps.update(1)
    codes = sparse_code_name(model)
    _plot_curve(stats, "coding_rate", "coding rate $R^c$", os.path.join(out, "coding_rate.png"),
                "compression: $R^c$ of each layer's input")
    _plot_curve(stats, "l0", "normalized $\\ell_0$ (1 - sparsity)", os.path.join(out, "sparsity.png"),
                f"sparsification: {codes} $\\ell_0$")
    steps.update(1)
    maps = attention_maps(model, images, layer, heads=heads, pos_interp=pos_interp)   # (B, len(heads), h, w)
    masks = threshold_masks(maps, tau)
    steps.update(1)
    for i in range(len(images)):
        _plot_heads(pictures[i], maps[i].cpu().numpy(), os.path.join(out, f"attention_{i}.png"),
                    f"CLS attention per head, layer {layer + 1}", labels=heads)
        _plot_heads(pictures[i], masks[i].float().cpu().numpy(), os.path.join(out, f"masks_{i}.png"),
                    f"masks holding {tau:.0%} of each head's attention", cmap="viridis", labels=heads)
        steps.update(1)
    feats = patch_features(model, images, layer, pos_interp=pos_interp)
    fg = foreground_mask(feats, fg_threshold)
    _plot_pca(pictures, fg.cpu().numpy(), pca_rgb(feats, fg).cpu().numpy(), os.path.join(out, "pca.png"),
              fg_threshold)
    steps.update(1)
    result = {"family": family_name(model), "layers": stats, "sparsity_of": codes, "num_images": len(images),
              "image_size": int(images.shape[-1]), "attention_layer": layer, "attention_heads": heads, "tau": tau,
              "pos_interp": pos_interp, "fg_threshold": fg_threshold,
              "foreground_fraction": fg.flatten(1).float().mean(1).tolist(), "config": model.config.to_dict()}
    if mae:
        rec = mae_reconstruction(model, recon_images, mask_ratio, seed)
        denorm = " (norm_pix_loss: each patch de-normalized with its target's mean and std)" \
            if model.config.norm_pix_loss else ""
        _plot_reconstruction(rec, os.path.join(out, "reconstruction.png"),
                             f"mask ratio {mask_ratio:g}, seed {seed}, loss {rec['loss']:.4f}{denorm}")
        result["reconstruction"] = {"mask_ratio": mask_ratio, "seed": seed, "loss": rec["loss"],
                                    "norm_pix_loss": model.config.norm_pix_loss,
                                    "num_images": int(recon_images.shape[0])}
        steps.update(1)
    steps.close()
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    """The command line (see the module docstring). Returns 0, or 2 after printing `error: ...` for a
    missing or unreadable checkpoint or image, an unknown --arch, a --size not divisible by the patch, an
    out-of-range --layer / --heads / --tau / --fg-threshold / --mask-ratio, or --mask-ratio for a classifier;
    nothing is written before the arguments are checked."""
    ap = argparse.ArgumentParser(prog="python -m crate_fast.analyze", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="train.py checkpoint (best.pt / last.pt) or other weights")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--images", nargs="+", help="image files; 'digits' for the embedded data set")
    ap.add_argument("--arch", help="preset of weights that are not a run checkpoint (official files, state_dicts): "
                                   "crate_small, crate_alpha_base, mae_crate_base, ... (crate_fast.list_models())")
    ap.add_argument("--img-size", type=int, default=224, help="non-run weights: training image size")
    ap.add_argument("--patch-size", type=int, default=16, help="non-run weights: patch size")
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
    args = ap.parse_args(argv)
    try:
        model, data = load_model(args.ckpt, args.arch, args.img_size, args.patch_size, trusted=args.trust_checkpoint)
        size = args.size or model.config.img_size[0]
        if size % model.config.patch_size[0]:
            raise ValueError(f"--size {size} is not divisible by the patch size {model.config.patch_size[0]}")
        layer, heads = check_layer(model, args.layer), check_heads(model, args.heads)
        if not 0 < args.tau <= 1:
            raise ValueError(f"--tau must be in (0, 1], got {args.tau}")
        if not 0 <= args.fg_threshold < 1:
            raise ValueError(f"--fg-threshold must be in [0, 1), got {args.fg_threshold}")
        mae = isinstance(model, CRATEMAE)
        if args.mask_ratio is not None and not mae:
            raise ValueError(f"--mask-ratio is for CRATE-MAE models, not {type(model).__name__}")
        if args.mask_ratio is not None and not 0 < args.mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
        images, pictures = load_images(args.images, size)
        recon_images = None
        if mae and size != model.config.img_size[0]:       # the masked forward runs at the model's size only
            recon_images = load_images(args.images, model.config.img_size[0])[0]
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a file, not a directory")
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if data == "digits" and args.images is None:
        print("note: this model was trained on digits; pass --images digits for in-distribution pictures")
    result = analyze(model, images, pictures, args.out, layer=layer, heads=heads, tau=args.tau,
                     pos_interp=args.pos_interp, fg_threshold=args.fg_threshold, mask_ratio=args.mask_ratio,
                     seed=args.seed, recon_images=recon_images, device=args.device)
    rc = [round(s["coding_rate"], 1) for s in result["layers"]]
    sp = [round(s["sparsity"], 3) for s in result["layers"]]
    rec = f"; reconstruction loss {result['reconstruction']['loss']:.4f}" if mae else ""
    print(f"wrote {args.out}: coding rate per layer {rc}; sparsity per layer {sp}{rec}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
