"""The analysis pictures (matplotlib, Agg backend): per-layer curves, attention maps over the picture, the
PCA grid and CRATE-MAE's reconstruction grid. Every figure writer takes numpy arrays and a path."""
from __future__ import annotations

import numpy as np
import torch

from crate_fast.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curve(stats: list[dict], key: str, ylabel: str, path: str, title: str) -> None:
    """stats[i][key] over the layers, with stats[i][key + "_std"] as error bars."""
    plt = _pyplot()
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


def plot_heads(picture: np.ndarray, maps: np.ndarray, path: str, title: str, cmap: str = "inferno",
                labels: list[int] | None = None) -> None:
    """An (H, W, 3) picture, then each of the (heads, h, w) maps over it, in a grid."""
    plt = _pyplot()
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


def plot_pca(pictures: np.ndarray, mask: np.ndarray, rgb: np.ndarray, path: str, threshold: float) -> None:
    """(n, H, W, 3) pictures, their (n, h, w) foreground masks and (n, h, w, 3) PCA colours, in 3 rows."""
    plt = _pyplot()
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
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    return (x.cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def plot_reconstruction(rec: dict, path: str, title: str) -> None:
    """mae_reconstruction's four rows of pictures (ImageNet-normalized pixels), one column per image."""
    plt = _pyplot()
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


def plot_token_attention(maps: np.ndarray, labels: list[str], path: str, title: str,
                         heads: list[int] | None = None) -> None:
    """A language model's causal attention on a text: (heads, T, T) maps, one panel per head, queries as
    rows and keys as columns, each axis labelled with the tokens (labels, T strings)."""
    plt = _pyplot()
    n, t = maps.shape[0], maps.shape[-1]
    cols = min(n, 2)
    rows = int(np.ceil(n / cols))
    size = min(7.0, max(3.0, 0.12 * t))
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for h in range(n):
        ax = axes.flat[h]
        ax.axis("on")
        ax.imshow(maps[h], cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(t), labels, rotation=90, fontsize=6)
        ax.set_yticks(range(t), labels, fontsize=6)
        ax.set_title(f"head {h if heads is None else heads[h]}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
