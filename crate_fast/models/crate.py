"""The CRATE classifier (Yu et al., "White-Box Transformers via Sparse Rate Reduction", NeurIPS 2023),
exactly the math of the official ``model/crate.py`` (Ma-Lab-Berkeley/CRATE); docs/DESIGN.md §2.1.

    patches (channel-last) -> LN -> Linear -> LN -> [CLS; tokens] + learned positions
    -> depth x CRATEBlock:  z_half = z + MSSA(LN1(z));  z_next = ISTA(LN2(z_half))
    -> pool (CLS token or mean) -> LN -> Linear
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from torch import nn

from ..checkpoint import KeyMap
from ..config import Size, check_dropout, check_positive, to_2tuple
from ..kernels import check_impl
from ..layers import CRATEBlock, PatchEmbed, resample_pos_embed, set_impl

POOLS = ("cls", "mean")

# Official presets (model/crate.py, CRATE paper Table 1). dim_head = dim // heads: 64, 48 (!), 64, 64.
PRESETS: dict[str, dict] = {
    "crate_tiny": dict(dim=384, depth=12, heads=6),
    "crate_small": dict(dim=576, depth=12, heads=12),
    "crate_base": dict(dim=768, depth=12, heads=12),
    "crate_large": dict(dim=1024, depth=24, heads=16),
}


@dataclass(frozen=True)
class CRATEConfig:
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

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.patch_size[0] * self.patch_size[1]

    def replace(self, **changes: Any) -> CRATEConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)


class CRATE(nn.Module):
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
        self.grad_checkpointing = False
        # timm's model contract (crate_fast.timm_models): sizes and the data config of the evaluation
        self.num_features = self.head_hidden_size = self.embed_dim = cfg.dim
        self.num_prefix_tokens = 1
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=cfg.dim, reduction=cfg.patch_size[0])
                             for i in range(cfg.depth)]

    @property
    def impl(self) -> str:
        return self.config.impl

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def set_impl(self, impl: str) -> CRATE:
        """Use another MSSA/ISTA implementation from now on (one of crate_fast.kernels.IMPLS)."""
        set_impl(self, impl)
        self.config = self.config.replace(impl=impl)
        return self

    def pos_embed_for(self, grid: tuple[int, int], method: str = "size") -> torch.Tensor:
        """The (1, 1 + gh * gw, dim) position table for a patch grid (gh, gw): the table itself on the
        config's grid, else bicubic-interpolated by `method` ("size", the default for training and
        inference, or "dino", the CRATE notebooks' DINO formula; see layers.resample_pos_embed)."""
        return resample_pos_embed(self.pos_embed, self.config.grid_size, grid, method)

    def embed(self, img: torch.Tensor, pos_interp: str = "size") -> torch.Tensor:
        """(B, C, H, W) images -> (B, 1 + patches, dim) tokens entering the first block. `pos_interp`
        chooses how the position table is resized off the config's grid (pos_embed_for's `method`)."""
        grid = self.patch_embed.grid(img)
        x = self.patch_embed(img)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.pos_embed_for(grid, pos_interp)
        return self.pos_drop(x)

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Keep only the block's input; recompute its inside in the backward (same gradients).
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """Tokens after the last CRATE block: (B, 1 + patches, dim). No final norm (official)."""
        x = self.embed(img)
        for blk in self.blocks:
            x = self._block(blk, x)
        return x

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 1 + patches, dim) tokens -> (B, num_classes) logits; pre_logits=True: the normalized pooled
        (B, dim) features the classifier reads (timm's contract)."""
        x = tokens.mean(dim=1) if self.config.pool == "mean" else tokens[:, 0]  # mean includes CLS
        x = self.head_norm(x)
        return x if pre_logits else self.head(x)

    def forward_intermediates(self, img: torch.Tensor, indices: int | list[int] | None = None, *,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              return_prefix_tokens: bool = False, stop_early: bool = False):
        """timm's forward_intermediates: the tokens leaving the selected blocks (indices: the last n blocks
        for an int, else block numbers, negative from the end; default all). output_fmt "NCHW" gives
        (B, dim, h, w) patch maps, "NLC" (B, patches, dim) tokens; return_prefix_tokens adds the CLS token
        (B, 1, dim) to each. norm is refused (CRATE has no final norm before its head). Returns
        (final tokens (B, 1 + patches, dim), list) or the list alone with intermediates_only."""
        if norm:
            raise ValueError("CRATE has no final norm on its tokens (the classifier's LayerNorm follows pooling)")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self.block_indices(indices)
        depth = len(self.blocks)
        gh, gw = self.patch_embed.grid(img)
        x, out = self.embed(img), []
        last = max(take) if stop_early else depth - 1
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = self._block(blk, x)
            if i in take:
                patches = x[:, 1:]
                if output_fmt == "NCHW":
                    patches = patches.reshape(x.shape[0], gh, gw, -1).permute(0, 3, 1, 2)
                out.append((patches, x[:, :1]) if return_prefix_tokens else patches)
        return out if intermediates_only else (x, out)

    def block_indices(self, indices: int | list[int] | None) -> list[int]:
        """forward_intermediates' block selection as block numbers: None all, an int n the last n, a list
        of block numbers (negative from the end). Raises ValueError naming the valid range."""
        depth = len(self.blocks)
        if indices is None:
            return list(range(depth))
        if isinstance(indices, int):
            if not 0 < indices <= depth:
                raise ValueError(f"indices={indices}: the last n blocks, 1 <= n <= {depth}")
            return list(range(depth - indices, depth))
        take = [i % depth if -depth <= i < depth else None for i in indices]
        if None in take or not take:
            raise ValueError(f"indices {list(indices)}: block numbers in -{depth}..{depth - 1}")
        return take

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block during the backward instead of keeping its activations (timm's switch):
        the same gradients for one more forward of the blocks."""
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for num_classes (0: none, forward returns pre-logits); global_pool
        "token"/"avg" (timm) or "cls"/"mean" also switches the pooling."""
        pool = self.config.pool
        if global_pool is not None:
            from ..timm_models import pool_for

            pool = pool_for(global_pool)
        self.config = self.config.replace(num_classes=num_classes, pool=pool)
        device, dtype = self.head_norm.weight.device, self.head_norm.weight.dtype
        self.head = nn.Linear(self.config.dim, num_classes, device=device, dtype=dtype) if num_classes \
            else nn.Identity()

    @property
    def pretrained_cfg(self) -> dict:
        """timm's data config of this model (timm.data.resolve_data_config reads it)."""
        from ..timm_models import pretrained_cfg

        return pretrained_cfg(self)

    default_cfg = pretrained_cfg

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(img))

    def no_weight_decay(self) -> set[str]:
        """Parameter names that recipes may exclude from weight decay (timm convention)."""
        return {"cls_token", "pos_embed"}
