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

from ..checkpoint import KeyMap
from ..config import PatchGridConfig, Size, check_dropout, check_positive, to_2tuple
from ..kernels import check_impl
from ..layers import CRATEBlock, PatchEmbed
from .base import TokenClassifier

POOLS = ("cls", "mean")

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
        set_ = object.__setattr__  # frozen: normalize fields once, here
        set_(self, "img_size", to_2tuple(self.img_size, "img_size"))
        set_(self, "patch_size", to_2tuple(self.patch_size, "patch_size"))
        check_positive(self, "dim", "depth", "heads", "in_chans")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no classifier), got {self.num_classes!r}")
        if self.dim_head is None:
            if self.dim % self.heads:
                raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}; pass dim_head")
            set_(self, "dim_head", self.dim // self.heads)
        if self.dim_head <= 0:
            raise ValueError(f"dim_head must be positive, got {self.dim_head}")
        for (i, p) in zip(self.img_size, self.patch_size, strict=True):
            if i % p:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        check_impl(self.impl)
        check_dropout(self, "dropout", "emb_dropout")
        if self.step_size <= 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")



class CRATE(TokenClassifier):
    """Patch embedding -> CLS + learned positions -> depth x CRATEBlock -> pool -> LN -> Linear.

    forward: (B, in_chans, H, W) images, any H x W divisible by the patch (positions are bicubically
    interpolated for another grid; the official code only slices the table) -> (B, num_classes) logits
    in the compute dtype. Switch the MSSA/ISTA implementation at any time with :meth:`set_impl`;
    parameters and state_dict keys never depend on it.
    """

    config_class = CRATEConfig
    # Official model/crate.py names: ours -> theirs (crate_fast.checkpoint.KeyMap).
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

