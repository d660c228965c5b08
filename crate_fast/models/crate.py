"""The CRATE classifier (Yu et al., "White-Box Transformers via Sparse Rate Reduction", NeurIPS 2023),
exactly the math of the official ``model/crate.py`` (Ma-Lab-Berkeley/CRATE); docs/DESIGN.md §2.1.

    patches (channel-last) -> LN -> Linear -> LN -> [CLS; tokens] + learned positions
    -> depth x CRATEBlock:  z_half = z + MSSA(LN1(z));  z_next = ISTA(LN2(z_half))
    -> pool (CLS token or mean) -> LN -> Linear
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..layers import CRATEBlock, PatchEmbed
from . import _flops
from ._config import PatchGridConfig, Size, check_dropout
from .base import CLASSIFIER_POOLS, TokenClassifier
from .family import Family
from .keys import KeyMap

# Official presets (model/crate.py, CRATE paper Table 1). dim_head = dim // heads: 64, 48 (!), 64, 64.
PRESETS: dict[str, dict] = {
    "crate_tiny": dict(dim=384, depth=12, heads=6),
    "crate_small": dict(dim=576, depth=12, heads=12),
    "crate_base": dict(dim=768, depth=12, heads=12),
    "crate_large": dict(dim=1024, depth=24, heads=16),
}


@dataclass(frozen=True)
class CRATEConfig(PatchGridConfig):
    """Everything that defines a CRATE classifier (official ``model/crate.py`` argument names in brackets).

    dim_head defaults to dim // heads, as in every official preset (CRATE-S: 576 / 12 = 48).
    step_size [ista] is the ISTA step eta; lambd the sparsity weight (a constant 0.1 in the official code).
    dropout is the attention and output-projection dropout, emb_dropout the one after the embedding.
    impl picks the math for MSSA and ISTA (see crate_fast.kernels.IMPLS); it never changes parameters,
    so a state_dict moves freely between impls. Raises ValueError on any invalid field.
    """

    dim: int
    depth: int
    heads: int
    dim_head: int | None = None
    img_size: Size = 224
    patch_size: Size = 16
    in_chans: int = 3
    num_classes: int = 1000
    pool: str = "cls"
    step_size: float = 0.1
    lambd: float = 0.1
    dropout: float = 0.0
    emb_dropout: float = 0.0
    impl: str = "auto"

    def __post_init__(self):
        self._check_tokens()
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), got {self.num_classes!r}")
        if self.pool not in CLASSIFIER_POOLS:
            raise ValueError(f"pool must be one of {CLASSIFIER_POOLS}, got {self.pool!r}")
        check_dropout(self, "dropout", "emb_dropout")
        if self.step_size <= 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")


def flops(cfg: CRATEConfig, *, training: bool = False, img_size: tuple[int, int] | None = None,
          ista: str = "2mm") -> int:
    """Matmul FLOPs of one image (docs/DESIGN.md §6): the patch embedding 2 P (C p^2) d, per layer MSSA
    4 N d inner + 4 N^2 inner and ISTA (4 N d^2 in the model's two-GEMM form, `ista`="3mm": the official
    6 N d^2), the classifier 2 d classes; N = P + 1 tokens at img_size (default the config's).
    training: x3. Raises ValueError for an unknown ista form."""
    p, embed = _flops.patches(cfg, img_size)
    n, inner = p + 1, cfg.heads * cfg.dim_head
    layer = _flops.mssa(n, cfg.dim, inner) + _flops.ista(n, cfg.dim, ista)
    return _flops.total(embed + cfg.depth * layer + 2 * cfg.dim * cfg.num_classes, training)


class CRATE(TokenClassifier):
    """Patch embedding -> CLS + learned positions -> depth x CRATEBlock -> pool -> LN -> Linear.

    forward: (B, in_chans, H, W) images, any H x W divisible by the patch (positions are bicubically
    interpolated for another grid; the official code only slices the table) -> (B, num_classes) logits
    in the compute dtype. Switch the MSSA/ISTA implementation at any time with :meth:`set_impl`;
    parameters and state_dict keys never depend on it.
    """

    config_class = CRATEConfig
    # Official model/crate.py names: ours -> theirs (models/keys.py).
    official_keys = KeyMap(
        top={
            "cls_token": "cls_token",
            "pos_embed": "pos_embedding",
            "patch_embed.norm_in.": "to_patch_embedding.1.",
            "patch_embed.proj.": "to_patch_embedding.2.",
            "patch_embed.norm_out.": "to_patch_embedding.3.",
            "head_norm.": "mlp_head.0.",
            "head.": "mlp_head.1.",
        },
        blocks={"blocks.": ("transformer.layers.", {
            "norm1.": "0.norm.",
            "attn.qkv.": "0.fn.qkv.",
            "attn.out.": "0.fn.to_out.0.",
            "norm2.": "1.norm.",
            "ista.": "1.fn.",
        })},
    )
    head_keys = ("head.",)                # what reset_head / a new class count replaces

    def __init__(self, config: CRATEConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim)
        # Official init: N(0, 1) for both (torch.randn), not the 0.02 of timm ViTs. Parameters are
        # created in the official order, so one seed gives the official model's initial weights.
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches + 1, cfg.dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(
            CRATEBlock(cfg.dim, cfg.heads, cfg.dim_head, step_size=cfg.step_size, lambd=cfg.lambd,
                       dropout=cfg.dropout, impl=cfg.impl)
            for _ in range(cfg.depth)
        )
        self.head_norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self._init_contract()


FAMILY = Family(
    "crate", "CRATE", "Yu et al., White-Box Transformers via Sparse Rate Reduction, NeurIPS 2023",
    CRATEConfig, CRATE, PRESETS, flops, objective="classification",
    train_fields=("img_size", "patch_size", "impl", "pool", "dropout"), timm=True)
