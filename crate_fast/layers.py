"""CRATE's building blocks as plain nn.Modules, ready to drop into other models.

- :class:`MSSA`: multi-head subspace self-attention (one bias-free projection, q = k = v).
- :class:`ISTA`: one non-negative ISTA sparse-coding step with a learned dictionary.
- :class:`CRATEBlock`: ``z_half = z + MSSA(LN1(z)); z_next = ISTA(LN2(z_half))`` (no outer residual).
- :class:`PatchEmbed`: official patchify (channel-last patches) -> LN -> Linear -> LN.

Each takes ``impl`` (one of crate_fast.kernels.IMPLS); parameters never depend on it, and
:func:`set_impl` switches every layer of a model at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crate_fast.kernels import check_impl, ista_step, mssa_attention
from crate_fast.kernels.reference import mssa_attention_ref


def set_impl(module: nn.Module, impl: str) -> None:
    """Switch every MSSA and ISTA layer inside `module` to `impl`. Raises ValueError for an unknown impl."""
    check_impl(impl)
    for m in module.modules():
        if isinstance(m, (MSSA, ISTA)):
            m.impl = impl


class MSSA(nn.Module):
    """Multi-head subspace self-attention. x: (B, N, dim) -> (B, N, dim).

    Per head k, w_k = x U_k (N x dim_head) serves as query, key and value:
    out = [softmax(w_k w_k^T / sqrt(dim_head)) w_k]_k U_out^T + b_out.
    ``dropout`` drops attention probabilities and the output, as the official Attention does; while
    training with dropout > 0 the attention runs on the reference path (the fused kernels have none).
    """

    def __init__(self, dim: int, heads: int, dim_head: int | None = None, dropout: float = 0.0,
                 impl: str = "auto"):
        super().__init__()
        dim_head = dim // heads if dim_head is None else dim_head
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.impl = check_impl(impl)
        self.attn_dropout = dropout
        self.qkv = nn.Linear(dim, inner, bias=False)   # U = [U_1 .. U_K], official name kept
        # The official code skips the output projection only for one head spanning the whole width.
        self.out = nn.Linear(inner, dim) if not (heads == 1 and dim_head == dim) else None
        self.out_drop = nn.Dropout(dropout)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The per-head subspace coordinates w = x U: (B, N, dim) -> (B, heads, N, dim_head)."""
        B, N, _ = x.shape
        return self.qkv(x).view(B, N, self.heads, self.dim_head).transpose(1, 2)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """softmax(w w^T * scale) for each head: (B, N, dim) -> (B, heads, N, N), in fp32."""
        w = self.project(x).float()
        return torch.softmax(torch.matmul(w, w.transpose(-1, -2)) * self.scale, dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        # attn_mask / is_causal exist so MSSA drops into timm-style blocks, which pass them.
        if attn_mask is not None or is_causal:
            raise NotImplementedError("MSSA attends over all tokens; masks and causal attention are not "
                                      "supported")
        B, N, _ = x.shape
        w = self.project(x)                                            # (B, H, N, D), strided view
        if self.attn_dropout > 0 and self.training:
            o = mssa_attention_ref(w, self.scale, self.attn_dropout, training=True)
        else:
            o = mssa_attention(w, self.scale, impl=self.impl)
        o = o.transpose(1, 2).reshape(B, N, self.heads * self.dim_head)   # 'b h n d -> b n (h d)'
        if self.out is None:
            return o
        return self.out_drop(self.out(o))

    def extra_repr(self) -> str:
        return f"heads={self.heads}, dim_head={self.dim_head}, impl={self.impl!r}"


class ISTA(nn.Module):
    """One ISTA step on a learned dictionary W (dim x dim), row form (tokens are rows):
    relu(x + eta (x W - x W^T W) - eta lambda). The official FeedForward; lambd is a constant."""

    def __init__(self, dim: int, step_size: float = 0.1, lambd: float = 0.1, impl: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        self.step_size, self.lambd = step_size, lambd
        self.impl = check_impl(impl)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight)   # official: a=0, fan_in = dim -> U(+-sqrt(6 / dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ista_step(x, self.weight, self.step_size, self.lambd, impl=self.impl)

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[0]}, step_size={self.step_size}, lambd={self.lambd}, impl={self.impl!r}"


class CRATEBlock(nn.Module):
    """One CRATE layer: compression (MSSA with residual), then sparsification (ISTA, no residual)."""

    def __init__(self, dim: int, heads: int, dim_head: int | None = None, step_size: float = 0.1,
                 lambd: float = 0.1, dropout: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MSSA(dim, heads, dim_head, dropout=dropout, impl=impl)
        self.norm2 = nn.LayerNorm(dim)
        self.ista = ISTA(dim, step_size=step_size, lambd=lambd, impl=impl)

    def set_impl(self, impl: str) -> None:
        set_impl(self, impl)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z_half = z + self.attn(self.norm1(z))
        return self.ista(self.norm2(z_half))


class PatchEmbed(nn.Module):
    """Official patch embedding: 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)', LN(patch_dim), Linear, LN(dim).

    The patch vector is channel-last (p1, p2, c), not the (c, p1, p2) order of a conv patchify.
    """

    def __init__(self, patch_size: tuple[int, int], in_chans: int, dim: int):
        super().__init__()
        self.patch_size, self.in_chans = patch_size, in_chans
        patch_dim = in_chans * patch_size[0] * patch_size[1]
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def grid(self, img: torch.Tensor) -> tuple[int, int]:
        if img.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(img.shape)}")
        _, c, h, w = img.shape
        p1, p2 = self.patch_size
        if c != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {c}")
        if h % p1 or w % p2:
            raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p1}x{p2}")
        return h // p1, w // p2

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid(img)
        B, C = img.shape[:2]
        p1, p2 = self.patch_size
        x = img.reshape(B, C, gh, p1, gw, p2).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, p1 * p2 * C)
        return self.norm_out(self.proj(self.norm_in(x)))


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int],
                       new_grid: tuple[int, int], method: str = "size") -> torch.Tensor:
    """Bicubic resize of a (1, 1 + gh*gw, C) position table with a leading CLS row to a new patch grid.

    pos_embed: (1, 1 + gh * gw, C), any float dtype (16-bit tables are resized in fp32, fp64 stays
    fp64; the result has the table's dtype). old_grid (gh, gw): the grid the table was trained on;
    new_grid (nh, nw): the grid wanted. The CLS row is kept as is; the same grid returns the table itself.
    method:
      "size" (the default, what the model uses for training and inference):
          F.interpolate(size=(nh, nw), mode="bicubic", align_corners=False); the source coordinate of
          output row i is (i + 0.5) * gh / nh - 0.5.
      "dino": DINO's interpolate_pos_encoding (facebookresearch/dino, vision_transformer.py), which the
          CRATE authors' notebooks use (LeslieTrue/crate-emergence-notebooks crate.py
          `CRATEFeat._fix_pos_enc`, Ma-Lab-Berkeley/CRATE vis_utils/shared_extractor.py):
          F.interpolate(scale_factor=((nh + 0.1) / gh, (nw + 0.1) / gw), mode="bicubic",
          align_corners=False, recompute_scale_factor=False), so the source coordinate of output row i
          is (i + 0.5) * gh / (nh + 0.1) - 0.5 (the +0.1 keeps floor(gh * scale) = nh). For a square
          training grid this is DINO's (w0 + 0.1) / sqrt(N), w0 the new rows (DINO's `w` is the image's
          dimension 2, its height), N = gh * gw. The two methods differ by several tenths on a
          unit-variance table (0.34 at most on a seeded 14x14 -> 28x28 one).
    Raises ValueError for an unknown method or a table whose patch rows are not gh * gw."""
    if method not in ("size", "dino"):
        raise ValueError(f"method must be 'size' or 'dino', got {method!r}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    C = grid.shape[-1]
    if grid.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(f"position table has {grid.shape[1]} patch rows, not {old_grid[0]}x{old_grid[1]}")
    work = torch.promote_types(pos_embed.dtype, torch.float32)
    grid = grid.reshape(1, old_grid[0], old_grid[1], C).permute(0, 3, 1, 2).to(work)
    if method == "size":
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    else:
        scale = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False,
                             recompute_scale_factor=False)
        if tuple(grid.shape[-2:]) != tuple(new_grid):      # cannot happen: floor(g * (n + 0.1) / g) = n
            raise RuntimeError(f"DINO interpolation gave a {tuple(grid.shape[-2:])} grid, not {tuple(new_grid)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)
