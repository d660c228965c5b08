"""Pictures and numbers of what a CRATE model does, layer by layer.

    python -m crate_fast.analyze --ckpt RUN_DIR/best.pt --out DIR [--images a.jpg b.png ...]
    python -m crate_fast.analyze --ckpt CRATE_small.pth --arch crate_small --out DIR      # official weights

Writes into DIR: stats.json (per-layer coding rate R^c, expansion R, sparsity, means and stds),
coding_rate.png and sparsity.png (curves over depth with error bars), attention_<i>.png (the CLS
token's attention of each head over image i at --layer, for the heads in --heads, default all),
masks_<i>.png (DINO-style masks keeping a fraction tau of each head's attention) and pca.png (the CRATE
notebooks' two-stage PCA of the patch features: the first component thresholded at --fg-threshold into a
foreground mask with holes filled, then 3 components of a PCA of the foreground patches as RGB, background
black). At a --size other than the training size the position table is resized as the notebooks do
(DINO's interpolate_pos_encoding; --pos-interp size: as the model's forward). Without --images it uses
scikit-image's bundled photographs; ``--images digits`` takes images of the embedded digits validation
set (what the README's main job trains on).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from . import create_model, load_weights
from .analysis import (
    attention_maps,
    check_heads,
    check_layer,
    foreground_mask,
    layer_stats,
    patch_features,
    pca_rgb,
    threshold_masks,
)
from .checkpoint import read_checkpoint, unwrap_state_dict
from .progress import Progress

PHOTOS = ["astronaut", "chelsea", "coffee", "motorcycle_left", "rocket", "hubble_deep_field"]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def load_model(path: str, arch: str | None, img_size: int, patch_size: int, *, trusted: bool = False):
    """(model, the --data it was trained on or None) from a train.py run checkpoint (last.pt / best.pt,
    which records its arch and sizes), or from other weights (official, or a bare state_dict) given
    --arch and the sizes. Files are read safely (crate_fast.read_checkpoint). Raises FileNotFoundError,
    ValueError, RuntimeError (crate_fast.checkpoint's errors)."""
    obj = read_checkpoint(path, trusted=trusted)
    sd = unwrap_state_dict(obj)
    run = obj.get("config") if isinstance(obj, dict) and isinstance(obj.get("config"), dict) else None
    if run is not None:
        arch, img_size, patch_size = arch or run["arch"], run["img_size"], run["patch_size"]
    elif arch is None:
        raise ValueError(f"{path!r} is not a train.py run checkpoint: pass --arch (e.g. crate_small) and, "
                         "if not 224/16, --img-size/--patch-size")
    head = sd.get("head.weight", sd.get("mlp_head.1.weight"))
    if head is None:
        raise ValueError(f"{path!r} has no classifier weights (head.weight or mlp_head.1.weight)")
    model = create_model(arch, num_classes=head.shape[0], img_size=img_size, patch_size=patch_size,
                         **({"pool": run.get("pool", "cls")} if run else {}))
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

        pics = [Image.fromarray(getattr(skd, name)()).convert("RGB") for name in PHOTOS]
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


def analyze(model, images: torch.Tensor, pictures: np.ndarray, out: str, *, layer: int = -1,
            heads: list[int] | None = None, tau: float = 0.6, pos_interp: str = "dino", fg_threshold: float = 0.5,
            device: str = "cpu", progress: bool = True) -> dict:
    """Compute everything and write every file into `out`. Returns the stats.json content.

    images: (B, 3, H, W) normalized batch; pictures: (B, H, W, 3) uint8 for display. layer / heads: the
    attention maps' block and heads (check_layer / check_heads rules); pos_interp: how the position table is
    resized off the training grid ("dino" or "size"); fg_threshold: the foreground_mask threshold.
    Raises ValueError / TypeError for a bad layer, head, tau, pos_interp or fg_threshold (before any work)."""
    layer, heads = check_layer(model, layer), check_heads(model, heads)
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if not 0 <= fg_threshold < 1:
        raise ValueError(f"fg_threshold must be in [0, 1), got {fg_threshold}")
    if pos_interp not in ("dino", "size"):
        raise ValueError(f"pos_interp must be 'dino' or 'size', got {pos_interp!r}")
    os.makedirs(out, exist_ok=True)
    model = model.to(device).eval()
    steps = Progress(4 + len(images), "analyzing", every=1, enabled=progress)
    stats = layer_stats(model, images, pos_interp=pos_interp)
    steps.update(1)
    _plot_curve(stats, "coding_rate", "coding rate $R^c$", os.path.join(out, "coding_rate.png"),
                "compression: $R^c$ of each layer's input")
    _plot_curve(stats, "l0", "normalized $\\ell_0$ (1 - sparsity)", os.path.join(out, "sparsity.png"),
                "sparsification: ISTA output $\\ell_0$")
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
    steps.close()
    result = {"layers": stats, "num_images": len(images), "image_size": int(images.shape[-1]),
              "attention_layer": layer, "attention_heads": heads, "tau": tau, "pos_interp": pos_interp,
              "fg_threshold": fg_threshold, "foreground_fraction": fg.flatten(1).float().mean(1).tolist(),
              "config": model.config.to_dict()}
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    """The command line (see the module docstring). Returns 0, or 2 after printing `error: ...` for a
    missing or unreadable checkpoint or image, a --size not divisible by the patch, or an out-of-range
    --layer / --heads / --tau / --fg-threshold; nothing is written before the arguments are checked."""
    ap = argparse.ArgumentParser(prog="python -m crate_fast.analyze", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="train.py checkpoint (best.pt / last.pt) or an official one")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--images", nargs="+", help="image files; 'digits' for the embedded data set")
    ap.add_argument("--arch", help="preset of an official checkpoint (crate_tiny/small/base/large)")
    ap.add_argument("--img-size", type=int, default=224, help="official checkpoints: training image size")
    ap.add_argument("--patch-size", type=int, default=16, help="official checkpoints: patch size")
    ap.add_argument("--size", type=int, help="analysis image size (default: the model's)")
    ap.add_argument("--layer", type=int, default=-1, help="layer for attention maps and PCA (0-based; -1: last)")
    ap.add_argument("--heads", type=int, nargs="+", help="heads to draw (0-based, e.g. --heads 0 2 5; default all)")
    ap.add_argument("--tau", type=float, default=0.6, help="attention mass kept by the masks")
    ap.add_argument("--fg-threshold", type=float, default=0.5,
                    help="foreground: first principal component, min-max scaled per image, above this (0.5)")
    ap.add_argument("--pos-interp", choices=("dino", "size"), default="dino",
                    help="position table off the training size: 'dino' (the CRATE notebooks' DINO formula, "
                         "default) or 'size' (as the model's forward)")
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
        images, pictures = load_images(args.images, size)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a file, not a directory")
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if data == "digits" and args.images is None:
        print("note: this model was trained on digits; pass --images digits for in-distribution pictures")
    result = analyze(model, images, pictures, args.out, layer=layer, heads=heads, tau=args.tau,
                     pos_interp=args.pos_interp, fg_threshold=args.fg_threshold, device=args.device)
    rc = [round(s["coding_rate"], 1) for s in result["layers"]]
    sp = [round(s["sparsity"], 3) for s in result["layers"]]
    print(f"wrote {args.out}: coding rate per layer {rc}; sparsity per layer {sp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
