"""CRATE-alpha (Yang et al., "Scaling White-Box Transformers for Vision", NeurIPS 2024), exactly the math
of the official PyTorch port (UCSC-VLAA/CRATE-alpha ``torch_inference/model/crate_alpha.py``) and of its
JAX trainer (``models/crate.py``); docs/DESIGN.md §2.2.

    Conv2d(kernel = stride = patch) -> [CLS; tokens] + learned positions
    -> depth x CRATEAlphaBlock:  z_half = z + MSSA(LN1(z));  z_next = z_half + ODL(LN2(z_half))
    -> token 0 -> LN -> Linear

What CRATE-alpha changes against CRATE: an overcomplete dictionary (4 dim atoms) coded by two ISTA steps
from zero, a decoupled synthesis dictionary D1, a residual around the sparse-coding block, bias-free
MSSA projections, LayerNorm eps 1e-6, a convolutional stem.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..layers import ConvPatchEmbed, CRATEAlphaBlock
from . import _flops
from .base import TokenClassifier
from .crate import CRATEConfig
from .family import Family
from .keys import KeyMap

# decode_variant of the official models/crate.py: width / depth / heads; eta = lambda = 0.1 for all.
# Default patch: the published models' (B/16, L/14; tiny and small as base, huge as large).
PRESETS: dict[str, dict] = {
    "crate_alpha_tiny": dict(dim=192, depth=12, heads=3),
    "crate_alpha_small": dict(dim=576, depth=12, heads=12),
    "crate_alpha_base": dict(dim=768, depth=12, heads=12),
    "crate_alpha_large": dict(dim=1024, depth=24, heads=16, patch_size=14),
    "crate_alpha_huge": dict(dim=1280, depth=32, heads=16, patch_size=14),
}


@dataclass(frozen=True)
class CRATEAlphaConfig(CRATEConfig):
    """Everything that defines a CRATE-alpha classifier: CRATEConfig's fields plus

    overcomplete_ratio: atoms per width of the dictionaries D, D1 (dim x ratio * dim; 4 in the paper).
    drop_path: the stochastic-depth rate of the last block, linear from 0 at the first (the JAX
        trainer's schedule; 0 in the published recipes). Needs timm when > 0.
    head_norm_eps: eps of the LayerNorm before the head: 1e-5 in the official PyTorch port (whose weights
        reproduce the published accuracy with it), 1e-6 in the JAX model that trained them.
    Raises ValueError on any invalid field.
    """

    overcomplete_ratio: int = 4
    drop_path: float = 0.0
    head_norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.overcomplete_ratio, int) or self.overcomplete_ratio < 1:
            raise ValueError(f"overcomplete_ratio must be an int >= 1, got {self.overcomplete_ratio!r}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if not self.head_norm_eps > 0:
            raise ValueError(f"head_norm_eps must be positive, got {self.head_norm_eps}")


def flops(cfg: CRATEAlphaConfig, *, training: bool = False, img_size: tuple[int, int] | None = None) -> int:
    """Matmul FLOPs of one image (docs/DESIGN.md §6): CRATE's terms with the ODL step, four N x d x m GEMMs
    (8 N d m, m = overcomplete_ratio x d atoms), in place of ISTA. training: x3."""
    p, embed = _flops.patches(cfg, img_size)
    n, inner = p + 1, cfg.heads * cfg.dim_head
    layer = _flops.mssa(n, cfg.dim, inner) + _flops.odl(n, cfg.dim, cfg.overcomplete_ratio * cfg.dim)
    return _flops.total(embed + cfg.depth * layer + 2 * cfg.dim * cfg.num_classes, training)


class CRATEAlpha(TokenClassifier):
    """Conv patch embedding -> CLS + learned positions -> depth x CRATEAlphaBlock -> pool -> LN -> Linear.

    forward: (B, in_chans, H, W) images, any H x W divisible by the patch (positions are bicubically
    interpolated for another grid) -> (B, num_classes) logits. Parameters and state_dict keys never
    depend on ``impl``; :meth:`set_impl` switches MSSA and ODL at any time. Initialization follows the JAX
    trainer that produced the published models (``models/crate.py``): stem kaiming-uniform with zero bias,
    CLS N(0, 1e-6), positions N(0, 0.02), MSSA projections and head N(0, 0.02), D and D1 U(+-sqrt(6/dim)),
    head bias zero.
    """

    config_class = CRATEAlphaConfig
    # The official PyTorch port's names: ours -> theirs (models/keys.py).
    official_keys = KeyMap(
        top={
            "cls_token": "cls_token",
            "pos_embed": "pos_embedding",
            "patch_embed.proj.": "conv1.",
            "head_norm.": "mlp_head.0.",
            "head.": "mlp_head.1.",
        },
        blocks={"blocks.": ("transformer.layers.", {
            "norm1.": "0.norm.",
            "attn.qkv.": "0.fn.qkv.",
            "attn.out.": "0.fn.to_out.0.",
            "norm2.": "1.norm.",
            "odl.": "1.fn.",
        })},
    )
    head_keys = ("head.",)
    # Finetuning at another patch size (the official fine-tuning config): the stem kernel is resized
    # bilinearly, as the JAX loader's jax.image.resize (crate_fast.checkpoint).
    resized_patch_keys = ("patch_embed.proj.weight",)
    pos_resample = "zoom"         # a position table of another grid: as the JAX fine-tuning (layers.py)

    def __init__(self, config: CRATEAlphaConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embed = ConvPatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim)
        self.pos_embed = nn.Parameter(torch.empty(1, cfg.num_patches + 1, cfg.dim))
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.pos_drop = nn.Dropout(cfg.emb_dropout)
        # the JAX trainer's schedule, np.linspace(0, drop_path, depth) (plain floats: works on the meta device)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(
            CRATEAlphaBlock(cfg.dim, cfg.heads, cfg.dim_head, overcomplete_ratio=cfg.overcomplete_ratio,
                            step_size=cfg.step_size, lambd=cfg.lambd, dropout=cfg.dropout, drop_path=rate,
                            impl=cfg.impl)
            for rate in rates
        )
        self.head_norm = nn.LayerNorm(cfg.dim, eps=cfg.head_norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        self.reset_parameters()
        self._init_contract()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The JAX trainer's initialization (class docstring)."""
        w = self.patch_embed.proj.weight                      # (dim, C, p, p): fan_in = C p p, as flax's
        bound = math.sqrt(6.0 / (w.shape[1] * w.shape[2] * w.shape[3]))
        nn.init.uniform_(w, -bound, bound)
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.pos_embed, std=0.02)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.qkv.weight, std=0.02)
            if blk.attn.out is not None:
                nn.init.normal_(blk.attn.out.weight, std=0.02)
            blk.odl.reset_parameters()
        if isinstance(self.head, nn.Linear):
            nn.init.normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters the official recipe does not decay: it decays only kernels matching '.*/kernel$' (the
        stem, the MSSA projections and the head), so not D, D1, norms, biases, positions or CLS."""
        decayed = {"patch_embed.proj.weight", "head.weight"}
        decayed |= {n for n, _ in self.named_parameters() if n.endswith(("attn.qkv.weight", "attn.out.weight"))}
        return {n for n, _ in self.named_parameters() if n not in decayed}


FAMILY = Family(
    "crate_alpha", "CRATE-alpha", "Yang et al., Scaling White-Box Transformers for Vision, NeurIPS 2024",
    CRATEAlphaConfig, CRATEAlpha, PRESETS, flops, objective="classification",
    train_fields=("img_size", "patch_size", "impl", "pool", "dropout", "drop_path"), timm=True)
