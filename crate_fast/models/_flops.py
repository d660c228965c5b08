"""The matmul FLOP terms the family files add up (docs/DESIGN.md §6). A multiply-add is 2 FLOPs; norms,
softmax and elementwise work are not counted, as in every MFU convention. Training is 3x forward
(the backward is 2x the forward)."""
from __future__ import annotations

TRAINING_FACTOR = 3
ISTA_FORMS = ("2mm", "3mm")


def mssa(n: int, d: int, inner: int, causal: bool = False) -> int:
    """MSSA on n tokens of width d with heads x dim_head = inner: U and output projections 2 x 2 n d inner,
    attention (w w^T, P w) 4 n^2 inner, half of it under a causal mask (the tiles above the diagonal)."""
    attention = 4 * n * n * inner
    return 4 * n * d * inner + (attention // 2 if causal else attention)


def ista(n: int, d: int, form: str = "2mm") -> int:
    """CRATE's ISTA step on n tokens: "2mm" 4 n d^2, the exact two-GEMM step (the model's real arithmetic;
    use it for MFU of every impl); "3mm" 6 n d^2, the official code's three GEMMs (impl="reference").
    Raises ValueError for another form."""
    if form not in ISTA_FORMS:
        raise ValueError(f"ista must be '2mm' or '3mm', got {form!r}")
    return (4 if form == "2mm" else 6) * n * d * d


def odl(n: int, d: int, atoms: int) -> int:
    """CRATE-alpha's ODL step on n tokens: four n x d x atoms GEMMs, 8 n d atoms."""
    return 8 * n * d * atoms


def patches(cfg, img_size: tuple[int, int] | None = None) -> tuple[int, int]:
    """(patches P, FLOPs of the patch embedding 2 P (C p^2) d) of an image model's config at img_size
    (default the config's)."""
    h, w = img_size or cfg.img_size
    p = (h // cfg.patch_size[0]) * (w // cfg.patch_size[1])
    return p, 2 * p * cfg.patch_dim * cfg.dim


def total(forward: int, training: bool) -> int:
    return TRAINING_FACTOR * forward if training else forward
