"""The CRATE classifier (Yu et al., NeurIPS 2023), exactly the official ``model/crate.py`` math."""
from __future__ import annotations

import torch
from torch import nn

from .config import CRATEConfig
from .layers import CRATEBlock, PatchEmbed, _check_impl, resample_pos_embed


class CRATE(nn.Module):
    """Patch embedding -> CLS + learned positions -> depth x CRATEBlock -> pool -> LN -> Linear.

    Inputs whose patch grid differs from ``config.img_size`` get bicubically interpolated position
    embeddings (the official code only slices the table). Switch the MSSA/ISTA implementation at any
    time with :meth:`set_impl`; parameters and state_dict keys never depend on it.
    """

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
        self.head = nn.Linear(cfg.dim, cfg.num_classes)

    @property
    def impl(self) -> str:
        return self.blocks[0].ista.impl

    def set_impl(self, impl: str) -> CRATE:
        """Use another MSSA/ISTA implementation from now on ("auto", "reference", "torch", "triton")."""
        _check_impl(impl)
        for blk in self.blocks:
            blk.set_impl(impl)
        self.config = self.config.replace(impl=impl)
        return self

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a patch grid, interpolated when it differs from the config's."""
        return resample_pos_embed(self.pos_embed, self.config.grid_size, grid)

    def embed(self, img: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, 1 + patches, dim) tokens entering the first block."""
        grid = self.patch_embed.grid(img)
        x = self.patch_embed(img)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.pos_embed_for(grid)
        return self.pos_drop(x)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """Tokens after the last CRATE block: (B, 1 + patches, dim). No final norm (official)."""
        x = self.embed(img)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        x = tokens.mean(dim=1) if self.config.pool == "mean" else tokens[:, 0]  # mean includes CLS
        return self.head(self.head_norm(x))

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(img))

    def no_weight_decay(self) -> set[str]:
        """Parameter names that recipes may exclude from weight decay (timm convention)."""
        return {"cls_token", "pos_embed"}
