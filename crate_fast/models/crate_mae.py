"""CRATE-MAE (Pai et al., "Masked Autoencoding via Structured Diffusion with White-Box Transformers",
ICLR 2024), exactly the math of the official ``model/crate_ae/`` (Ma-Lab-Berkeley/CRATE: crate_ae.py,
crate_encoder.py, crate_decoder.py, pos_embed.py); docs/DESIGN.md §2.3.

    Conv2d patch embedding -> random masking (FAIR MAE: argsort of uniform noise)
    -> [CLS; unshuffle(visible tokens ; mask tokens)] + fixed 2-D sin-cos positions
    -> depth x CRATEBlock (lambda = 0.5) -> LN            (the encoder sees every position)
    -> decoder_depth x CRATEDecoderBlock:  y = LN_a(x) W_dec^T;  x' = y - MSSA(LN_b(y))
    -> LN -> Linear to pixels -> drop CLS -> per-patch MSE on the masked patches

Unlike FAIR's MAE, the mask tokens enter the *encoder* (crate_ae.py forward_encoder), and the positions
are added after unshuffling; a CRATE-MAE that dropped masked tokens from its encoder would be another
model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..layers import MSSA, Block, ConvPatchEmbed, CRATEBlock, patch_grid, resample_pos_embed
from . import _flops, crate
from ._config import PatchGridConfig, Size
from .base import POOLS, CRATEModel, TokenClassifier
from .crate import CRATEConfig
from .family import Family
from .keys import KeyMap

# crate_ae.py mae_crate_*: patch 16, decoder as wide and (here by default) as deep as the encoder,
# dim_head = dim // heads (48 for small). Parameter counts (every state_dict entry, the frozen tables and
# the unused decoder_embed included): 11,555,328 / 25,405,824 / 44,638,464 / 154,274,560.
PRESETS: dict[str, dict] = {
    "mae_crate_tiny": dict(dim=384, depth=12, heads=6),
    "mae_crate_small": dict(dim=576, depth=12, heads=12),
    "mae_crate_base": dict(dim=768, depth=12, heads=12),
    "mae_crate_large": dict(dim=1024, depth=24, heads=16),
    # The CPU demo's size (./run.sh mae, the mae_digits recipe): on 8x8 digits at 16 px / patch 4 the
    # 12-layer width-384 tiny model does not learn to reconstruct in minutes (docs/TRAINING.md); this does.
    "mae_crate_digits": dict(dim=192, depth=4, heads=3),
}


def _check_mask_ratio(mask_ratio: Any) -> None:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")


@dataclass(frozen=True)
class CRATEMAEConfig(PatchGridConfig):
    """Everything that defines a CRATE-MAE (official ``MaskedAutoencoderViT`` argument names in brackets).

    dim [embed_dim = decoder_embed_dim], depth [depth], heads [num_heads = decoder_num_heads];
    decoder_depth defaults to depth (every official preset); dim_head defaults to dim // heads.
    step_size is the encoder ISTA step eta (0.1, fixed officially); lambd [lambd] the encoder ISTA
    sparsity weight, 0.5 by default (the class default the released checkpoint was trained with).
    mask_ratio: the fraction of patches masked by :meth:`CRATEMAE.forward` (0.75, FAIR's default).
    norm_pix_loss: standardize each target patch by its own mean and variance.
    impl picks the math for MSSA and ISTA (crate_fast.kernels.IMPLS); it never changes parameters.
    dim must be a multiple of 4 (the 2-D sin-cos table splits it in four). Raises ValueError on any
    invalid field.
    """

    dim: int
    depth: int
    heads: int
    decoder_depth: int | None = None
    dim_head: int | None = None
    img_size: Size = 224
    patch_size: Size = 16
    in_chans: int = 3
    step_size: float = 0.1
    lambd: float = 0.5
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False
    impl: str = "auto"

    def __post_init__(self):
        if self.decoder_depth is None:
            object.__setattr__(self, "decoder_depth", self.depth)     # frozen: set once, here
        self._check_tokens("decoder_depth")
        if self.dim % 4:
            raise ValueError(f"dim must be a multiple of 4 (the 2-D sin-cos position table), got {self.dim}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")
        if not self.lambd >= 0:
            raise ValueError(f"lambd must be >= 0, got {self.lambd}")
        _check_mask_ratio(self.mask_ratio)
        if not isinstance(self.norm_pix_loss, bool):
            raise ValueError(f"norm_pix_loss must be a bool, got {self.norm_pix_loss!r}")


def flops(cfg: CRATEMAEConfig, *, training: bool = False, img_size: tuple[int, int] | None = None,
          ista: str = "2mm") -> int:
    """Matmul FLOPs of one image (docs/DESIGN.md §6): the encoder layers as CRATE's on all N = P + 1 tokens
    (mask tokens included), decoder layers W_dec 2 N d^2 + MSSA, the pixel head 2 N d (C p^2).
    training: x3. Raises ValueError for an unknown ista form."""
    p, embed = _flops.patches(cfg, img_size)
    n, d, inner = p + 1, cfg.dim, cfg.heads * cfg.dim_head
    encoder = cfg.depth * (_flops.mssa(n, d, inner) + _flops.ista(n, d, ista))
    decoder = cfg.decoder_depth * (2 * n * d * d + _flops.mssa(n, d, inner)) + 2 * n * d * cfg.patch_dim
    return _flops.total(embed + encoder + decoder, training)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """FAIR MAE's fixed 2-D sin-cos position table with a leading CLS row of zeros: (1 + gh * gw, dim) float32.

    Row 1 + i * gw + j (patch row i, column j) is [sin(j w), cos(j w), sin(i w), cos(i w)] with the dim / 4
    frequencies w_k = 10000^(-k / (dim / 4)): the first half encodes the column (FAIR names it "h", its
    meshgrid puts w first), the second half the row (official pos_embed.py get_2d_sincos_pos_embed).
    Evaluated with numpy in float32, step by step as FAIR's code: numpy's float32 power, sin and cos are
    what made the official table, and torch's kernels differ from them in the last bit. Raises ValueError
    if dim is not a multiple of 4."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    freq = np.float32(1.0) / np.power(np.float32(10000), np.arange(quarter, dtype=np.float32) / np.float32(quarter))
    rows, cols = np.meshgrid(np.arange(grid[0], dtype=np.float32), np.arange(grid[1], dtype=np.float32),
                             indexing="ij")

    def axis(pos: np.ndarray) -> np.ndarray:        # (M,) positions -> (M, dim / 2) [sin | cos]
        angles = np.outer(pos.reshape(-1), freq)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([np.zeros((1, dim), np.float32), np.concatenate([axis(cols), axis(rows)], axis=1)])
    return torch.from_numpy(table)


class Dictionary(nn.Module):
    """A learned square dictionary W (dim x dim) applied to rows: x -> x W^T, no bias (the official decoder
    FeedForward, "A@x"). Initialized kaiming-uniform (a = 0) as officially, not as an nn.Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}"


class CRATEDecoderBlock(Block):
    """One CRATE-MAE decoder layer (official crate_decoder.py Block_CRATE), x: (B, N, dim) -> (B, N, dim):

        y = LN_a(x) W_dec^T;   x' = y - MSSA(LN_b(y))

    W_dec (``dictionary``) is one linear map: no bias, no ReLU, no residual (the official FeedForward's
    step_size and lambd = 5.0 are unused). The minus makes the attention step the inverse (ascent) of the
    encoder's compression; the weights are not tied to the encoder's. LayerNorm eps 1e-5, MSSA output
    projection with bias, as officially.
    """

    def __init__(self, dim: int, heads: int, dim_head: int | None = None, impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.dictionary = Dictionary(dim)          # a module, so state_dict lists it after norm1 (official order)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = MSSA(dim, heads, dim_head, impl=impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dictionary(self.norm1(x))
        return y - self.attn(self.norm2(y))


class CRATEMAE(CRATEModel):
    """CRATE masked autoencoder (module docstring). forward(imgs (B, in_chans, H, W), mask_ratio, noise)
    -> (loss, pred (B, L, patch_dim), mask (B, L)), the official ``MaskedAutoencoderViT.forward``;
    forward_features / pooled give the encoder's features of whole images (linear probes).

    Same seed, same initial weights as the official model: modules are built in the official order and
    re-initialized as its ``initialize_weights`` (xavier-uniform Linear weights and the flattened patch
    conv, zero biases, CLS and mask tokens N(0, 0.02); the ISTA and decoder dictionaries keep their
    kaiming-uniform init). Parameters and state_dict keys never depend on ``impl``.
    """

    config_class = CRATEMAEConfig
    # Official crate_ae.py names: ours -> theirs (models/keys.py). Blocks hold a one-element
    # ModuleList `layers` of [PreNorm, PreNorm] officially, hence 'layers.0.'.
    official_keys = KeyMap(
        top={name: name for name in ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed",
                                     "patch_embed.proj.", "norm.", "decoder_embed.", "decoder_norm.",
                                     "decoder_pred.")},
        blocks={
            "blocks.": ("blocks.", {
                "norm1.": "layers.0.0.norm.",
                "attn.qkv.": "layers.0.0.fn.qkv.",
                "attn.out.": "layers.0.0.fn.to_out.0.",
                "norm2.": "layers.0.1.norm.",
                "ista.": "layers.0.1.fn.",
            }),
            "decoder_blocks.": ("decoder_blocks.", {
                "norm1.": "layers.0.0.norm.",
                "dictionary.": "layers.0.0.fn.",
                "norm2.": "layers.0.1.norm.",
                "attn.qkv.": "layers.0.1.fn.qkv.",
                "attn.out.": "layers.0.1.fn.to_out.0.",
            }),
        },
    )
    head_keys = ()             # no classifier
    # The position tables are fixed functions of the config's grid, never resampled from a file: a file of
    # another grid is a shape mismatch (crate_fast.checkpoint).
    resampled_pos_keys = ()

    def __init__(self, config: CRATEMAEConfig):
        super().__init__()
        self.config = cfg = config
        n_tokens = cfg.num_patches + 1
        self.patch_embed = ConvPatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        # The fixed tables are non-trainable parameters as officially (same state_dict keys and order, and
        # the paper's parameter count includes them). pos_embed is never used (the encoder adds
        # decoder_pos_embed, crate_ae.py forward_encoder); it is kept so official files load strictly.
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, cfg.dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            CRATEBlock(cfg.dim, cfg.heads, cfg.dim_head, step_size=cfg.step_size, lambd=cfg.lambd, impl=cfg.impl)
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        # Dead: the official forward_decoder never calls it (no gradient ever reaches it); kept for the keys.
        # Frozen, unlike officially: DDP refuses parameters that get no gradient (FAIR's main_pretrain.py
        # pays find_unused_parameters=True for this one layer); an optimizer never changes it either way.
        self.decoder_embed = nn.Linear(cfg.dim, cfg.dim).requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_tokens, cfg.dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            CRATEDecoderBlock(cfg.dim, cfg.heads, cfg.dim_head, impl=cfg.impl) for _ in range(cfg.decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.dim, cfg.patch_dim)
        self.num_features = cfg.dim
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official initialize_weights, in its order (so one seed gives the official weights)."""
        table = sincos_pos_embed_2d(self.config.dim, self.config.grid_size)
        self.pos_embed.copy_(table)
        self.decoder_pos_embed.copy_(table)
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))    # the conv as the Linear it is
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():     # the Linear layers in the official self.apply order (leaves, in order)
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """What the official pretraining (FAIR main_pretrain.py, timm add_weight_decay) does not decay:
        biases, 1-D parameters (LayerNorms) and the frozen tables. cls_token and mask_token are decayed."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or n.endswith(".bias") or not p.requires_grad}

    # --- pixels <-> patches -----------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, L, p1 * p2 * in_chans), each patch channel-last ('nchpwq->nhwpqc',
        crate_ae.py patchify): the layout of pred. Raises ValueError for a wrong channel count or a size
        the patch does not divide."""
        gh, gw = patch_grid(imgs, self.config.patch_size, self.config.in_chans)
        (p1, p2), B, C = self.config.patch_size, imgs.shape[0], imgs.shape[1]
        x = imgs.reshape(B, C, gh, p1, gw, p2).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, gh * gw, p1 * p2 * C)

    def unpatchify(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, L, p1 * p2 * in_chans) -> (B, in_chans, gh * p1, gw * p2), the inverse of patchify; grid
        (gh, gw) defaults to the config's. Raises ValueError when x does not fit the grid."""
        gh, gw = self.config.grid_size if grid is None else grid
        (p1, p2), C = self.config.patch_size, self.config.in_chans
        if x.dim() != 3 or x.shape[1:] != (gh * gw, p1 * p2 * C):
            raise ValueError(f"expected patches of shape (B, {gh * gw}, {p1 * p2 * C}), got {tuple(x.shape)}")
        x = x.reshape(x.shape[0], gh, gw, p1, p2, C).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], C, gh * p1, gw * p2)

    # --- masked autoencoding ----------------------------------------------------------------------------
    def random_masking(self, x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """FAIR MAE's per-sample random masking (crate_ae.py random_masking): the patches with the
        int(L * (1 - mask_ratio)) smallest noise values are kept.

        x: (B, L, D); noise: (B, L) floats, default torch.rand (pass it to mask reproducibly). Returns
        x_kept (B, keep, D) in the order of increasing noise, mask (B, L) in the default float dtype (1 on
        removed patches), ids_restore (B, L) int64 (the permutation that unshuffles). Raises ValueError for
        a mask_ratio outside [0, 1) or noise of another shape."""
        _check_mask_ratio(mask_ratio)
        B, L, D = x.shape
        if noise is None:
            noise = torch.rand(B, L, device=x.device)
        elif noise.shape != (B, L):
            raise ValueError(f"noise must have shape (batch, patches) = {(B, L)}, got {tuple(noise.shape)}")
        keep = int(L * (1 - mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)           # ascending: small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x_kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :keep] = 0
        return x_kept, torch.gather(mask, 1, ids_restore), ids_restore

    def _check_training_size(self, imgs: torch.Tensor) -> None:
        grid = patch_grid(imgs, self.config.patch_size, self.config.in_chans)
        if grid != self.config.grid_size:
            raise ValueError(
                f"CRATE-MAE's masked forward needs {self.config.img_size[0]}x{self.config.img_size[1]} images "
                f"(its position table is fixed to the config's patch grid), got {imgs.shape[2]}x{imgs.shape[3]}; "
                "build the model with this img_size, or use forward_features (any size)")

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Mask, then encode every position (crate_ae.py forward_encoder).

        imgs: (B, in_chans, H, W) at the config's img_size. Returns latent (B, 1 + L, dim) after ``norm``
        (CLS first, then the L patch positions in image order, masked ones holding encoded mask tokens),
        mask (B, L) and ids_restore (B, L) as :meth:`random_masking`. Raises ValueError for another image
        size or channel count, a mask_ratio outside [0, 1) or noise of another shape."""
        self._check_training_size(imgs)
        x = self.patch_embed(imgs)
        x_kept, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        B, L = mask.shape
        # Visible tokens, then one mask token per removed patch, unshuffled back to image order. (torch.cat
        # promotes a 16-bit x to the tokens' fp32 under autocast, as the official code does.)
        x = torch.cat([x_kept, self.mask_token.expand(B, L - x_kept.shape[1], -1)], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.decoder_pos_embed
        return self.norm(self.run_blocks(self.blocks, x)), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L, dim) latent -> pred (B, L, patch_dim) pixels of every patch in patchify's layout
        (crate_ae.py forward_decoder: no decoder_embed, no positions added; the CLS row is dropped last)."""
        x = self.decoder_norm(self.run_blocks(self.decoder_blocks, latent))
        return self.decoder_pred(x)[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches (crate_ae.py forward_loss).

        imgs (B, in_chans, H, W), pred (B, L, patch_dim), mask (B, L) with 1 on removed patches. With
        norm_pix_loss each target patch is standardized: (t - mean) / sqrt(var + 1e-6), var unbiased
        (torch.var's default, as officially). A mask without removed patches gives NaN (0 / 0), as the
        official code. Returns a 0-dim tensor. Raises ValueError when the shapes disagree."""
        target = self.patchify(imgs)
        if pred.shape != target.shape or mask.shape != target.shape[:2]:
            raise ValueError(f"pred {tuple(pred.shape)} and mask {tuple(mask.shape)} do not fit the images' "
                             f"patches {tuple(target.shape)}")
        if self.config.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None):
        """(loss (0-dim), pred (B, L, patch_dim), mask (B, L)) for (B, in_chans, H, W) images at the config's
        img_size; mask_ratio None: the config's; noise (B, L): the masking noise (default torch.rand)."""
        latent, mask, _ = self.forward_encoder(imgs, self.config.mask_ratio if mask_ratio is None else mask_ratio,
                                               noise)
        pred = self.forward_decoder(latent)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # --- features of whole images -----------------------------------------------------------------------
    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The encoder on every patch, unmasked: (B, in_chans, H, W) -> (B, 1 + L, dim) tokens after ``norm``.

        At the config's size this is exactly forward_encoder's latent at mask_ratio 0 (which keeps every
        patch and unshuffles them back; tested bit for bit). Any other size divisible by the patch works:
        decoder_pos_embed is then bicubically interpolated as the official attention helpers do
        (crate_ae.py interpolate_pos_encoding, DINO's formula). Raises ValueError for a wrong channel count
        or a size the patch does not divide."""
        return self.norm(self.run_blocks(self.blocks, self.embed(imgs)))

    def embed(self, imgs: torch.Tensor, pos_interp: str = "dino") -> torch.Tensor:
        """The tokens forward_features feeds the encoder: (B, in_chans, H, W) -> (B, 1 + L, dim), patches
        after CLS, plus decoder_pos_embed (resized off the config's grid by `pos_interp`, "dino" as the
        official helpers or "size": layers.resample_pos_embed)."""
        grid = self.patch_embed.grid(imgs)
        x = self.patch_embed(imgs)
        pos = resample_pos_embed(self.decoder_pos_embed, self.config.grid_size, grid, pos_interp)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False, pool: str = "cls") -> torch.Tensor:
        """(B, 1 + L, dim) tokens of forward_features -> (B, dim) features: the CLS token ("cls") or the
        mean of the patch tokens ("mean", CLS excluded, as FAIR MAE's global pool). CRATE-MAE has no
        classifier, so pre_logits (timm's contract) changes nothing. Raises ValueError for another pool."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        return tokens[:, 1:].mean(dim=1) if pool == "mean" else tokens[:, 0]

    def pooled(self, imgs: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """(B, in_chans, H, W) images -> (B, dim) features for a linear probe (forward_features, then
        forward_head's pooling)."""
        return self.forward_head(self.forward_features(imgs), pool=pool)


# ---------------------------------------------------------------------------------------------------
# The pretrained encoder as a classifier (fine-tuning)
# ---------------------------------------------------------------------------------------------------
CLASSIFIER_PRESETS: dict[str, dict] = {f"{name}_cls": {k: v for k, v in preset.items() if k != "decoder_depth"}
                                       for name, preset in PRESETS.items()}


@dataclass(frozen=True)
class CRATEMAEClassifierConfig(CRATEConfig):
    """A CRATE-MAE encoder with a classifier: CRATEConfig's fields (num_classes, pool, dropout ...) with the
    encoder's ISTA lambda of 0.5 by default; dim must be a multiple of 4 (the sin-cos table)."""

    lambd: float = 0.5

    def __post_init__(self):
        super().__post_init__()
        if self.dim % 4:
            raise ValueError(f"dim must be a multiple of 4 (the 2-D sin-cos position table), got {self.dim}")


class CRATEMAEClassifier(TokenClassifier):
    """The CRATE-MAE encoder fine-tuned as a classifier: conv patch embedding -> CLS + the fixed 2-D sin-cos
    positions -> depth x CRATEBlock (lambda 0.5) -> pool -> LN (eps 1e-6: the encoder's ``norm``, which
    commutes with taking the CLS token) -> Linear. The official code has no such model (FAIR's
    main_finetune.py builds a ViT, into which a CRATE-MAE checkpoint loads nothing); this is the encoder
    exactly as it ran in pretraining, plus a linear head.

    Weights of a CRATE-MAE pretraining (a crate-fast run or the official layout) load with
    ``crate_fast.load_weights(model, path, reset_head=True)`` (``train.py --finetune``): the encoder's
    keys map onto this model's and the decoder and mask token are skipped (crate_fast.checkpoint).
    """

    config_class = CRATEMAEClassifierConfig
    official_keys = None          # no official model: files in CRATE-MAE's layouts load (pretrained_from)
    head_keys = ("head.",)
    # crate_fast.checkpoint: a CRATE-MAE state_dict (ours, or official through CRATEMAE.official_keys) names
    # this model's parameters after these prefix renames; its keys starting with pretrain_dropped are the
    # decoder's (and pos_embed's twin), skipped and reported.
    pretrained_from = CRATEMAE
    pretrain_renames = {"norm.": "head_norm."}
    pretrain_dropped = ("mask_token", "decoder_")

    def __init__(self, config: CRATEMAEClassifierConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embed = ConvPatchEmbed(cfg.patch_size, cfg.in_chans, cfg.dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed_2d(cfg.dim, cfg.grid_size)[None], requires_grad=False)
        self.pos_drop = nn.Dropout(cfg.emb_dropout)
        self.blocks = nn.ModuleList(
            CRATEBlock(cfg.dim, cfg.heads, cfg.dim_head, step_size=cfg.step_size, lambd=cfg.lambd,
                       dropout=cfg.dropout, impl=cfg.impl)
            for _ in range(cfg.depth)
        )
        self.head_norm = nn.LayerNorm(cfg.dim, eps=1e-6)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes else nn.Identity()
        nn.init.normal_(self.cls_token, std=0.02)
        self._init_contract()


FAMILY = Family(
    "crate_mae", "CRATE-MAE",
    "Pai et al., Masked Autoencoding via Structured Diffusion with White-Box Transformers, ICLR 2024",
    CRATEMAEConfig, CRATEMAE, PRESETS, flops, objective="masked_autoencoding",
    train_fields=("img_size", "patch_size", "impl", "mask_ratio", "norm_pix_loss"))
CLASSIFIER_FAMILY = Family(
    "crate_mae_cls", "CRATE-MAE classifier",
    "a CRATE-MAE encoder fine-tuned with a linear head (Pai et al., ICLR 2024)",
    CRATEMAEClassifierConfig, CRATEMAEClassifier, CLASSIFIER_PRESETS, crate.flops, objective="classification",
    train_fields=("img_size", "patch_size", "impl", "pool", "dropout"), timm=True)
