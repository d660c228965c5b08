"""CRATE's building blocks as plain nn.Modules, ready to drop into other models.

- :class:`MSSA`: multi-head subspace self-attention (one bias-free projection, q = k = v).
- :class:`ISTA`: one non-negative ISTA sparse-coding step with a learned dictionary.
- :class:`CRATEBlock`: ``z_half = z + MSSA(LN1(z)); z_next = ISTA(LN2(z_half))`` (no outer residual).
- :class:`PatchEmbed`: official patchify (channel-last patches) -> LN -> Linear -> LN.
- :class:`ODL`: CRATE-alpha's overcomplete dictionary learning block (two ISTA steps on a 4x
  overcomplete dictionary D, synthesis by a decoupled dictionary D1).
- :class:`CRATEAlphaBlock`: ``z_half = z + MSSA(LN1(z)); z_next = z_half + ODL(LN2(z_half))``.
- :class:`OvercompleteISTA`: CRATE-GPT's two ISTA steps on an overcomplete dictionary tied between
  analysis and synthesis (the ODL operator with D = D1, no residual).
- :class:`Block`: what the blocks share (``set_impl``; ``compress`` / ``sparsify`` for the analysis).
- :class:`ConvPatchEmbed`: Conv2d(kernel = stride = patch) patch embedding (CRATE-alpha, CRATE-MAE).

Each takes ``impl`` (one of crate_fast.kernels.IMPLS); parameters never depend on it, and
:func:`set_impl` switches every layer of a model at once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crate_fast.kernels import check_impl, ista_step, mssa_attention, odl_step
from crate_fast.kernels.reference import mssa_attention_ref, odl_codes_ref


def set_impl(module: nn.Module, impl: str) -> None:
    """Switch every MSSA, ISTA and ODL layer inside `module` to `impl`. Raises ValueError for an unknown impl."""
    check_impl(impl)
    for m in module.modules():
        if isinstance(m, (MSSA, ISTA, ODL, OvercompleteISTA)):
            m.impl = impl


class Block(nn.Module):
    """What the CRATE blocks share: ``set_impl`` (:func:`set_impl` on the block), and for the white-box
    analysis the two halves of a layer: ``compress(z) -> z_half = z + MSSA(LN1(z))`` (the block's own
    attention: causal in CRATE-GPT) and ``sparsify(z_half) -> (block output, sparse codes)``, with
    ``codes_name``, what those codes are."""

    codes_name = "codes"

    def set_impl(self, impl: str) -> None:
        set_impl(self, impl)

    def compress(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.attn(self.norm1(z))


class MSSA(nn.Module):
    """Multi-head subspace self-attention. x: (B, N, dim) -> (B, N, dim).

    Per head k, w_k = x U_k (N x dim_head) serves as query, key and value:
    out = [softmax(w_k w_k^T / sqrt(dim_head)) w_k]_k U_out^T + b_out.
    ``dropout`` drops attention probabilities and the output, as the official Attention does; while
    training with dropout > 0 the attention runs on the reference path (the fused kernels have none).
    ``out_bias=False`` drops b_out (CRATE-alpha's output projection has none). ``out_proj``: True always
    keeps U_out (CRATE-GPT's c_proj); None (default) follows the official CRATE, which skips it for one
    head spanning the whole width. ``recompute=True`` saves each row's log-sum-exp instead of the attention
    probabilities for the backward (impl="torch"; crate_fast.kernels.mssa_attention).
    """

    def __init__(self, dim: int, heads: int, dim_head: int | None = None, dropout: float = 0.0,
                 impl: str = "auto", out_bias: bool = True, out_proj: bool | None = None, recompute: bool = False):
        super().__init__()
        dim_head = dim // heads if dim_head is None else dim_head
        inner = heads * dim_head
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head ** -0.5
        self.impl = check_impl(impl)
        self.attn_dropout, self.recompute = dropout, recompute
        self.qkv = nn.Linear(dim, inner, bias=False)   # U = [U_1 .. U_K], official name kept
        # The official code skips the output projection only for one head spanning the whole width.
        keep = out_proj if out_proj is not None else not (heads == 1 and dim_head == dim)
        self.out = nn.Linear(inner, dim, bias=out_bias) if keep else None
        self.out_drop = nn.Dropout(dropout)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The per-head subspace coordinates w = x U: (B, N, dim) -> (B, heads, N, dim_head)."""
        B, N, _ = x.shape
        return self.qkv(x).view(B, N, self.heads, self.dim_head).transpose(1, 2)

    def attend(self, w: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """softmax(w w^T * scale) w per head, causally masked when is_causal: (B, heads, N, dim_head) ->
        (B, heads, N, dim_head); with dropout on the probabilities while training (the reference path)."""
        if self.attn_dropout > 0 and self.training:
            return mssa_attention_ref(w, self.scale, self.attn_dropout, training=True, causal=is_causal)
        return mssa_attention(w, self.scale, causal=is_causal, impl=self.impl, recompute=self.recompute)

    def merge(self, o: torch.Tensor) -> torch.Tensor:
        """Per-head outputs (B, heads, N, dim_head) -> (B, N, dim): heads concatenated, the output projection
        and its dropout."""
        B, _, N, _ = o.shape
        o = o.transpose(1, 2).reshape(B, N, self.heads * self.dim_head)        # 'b h n d -> b n (h d)'
        return o if self.out is None else self.out_drop(self.out(o))

    def attention_probs(self, x: torch.Tensor, is_causal: bool = False) -> torch.Tensor:
        """softmax(w w^T * scale) for each head, causally masked when is_causal: (B, N, dim) ->
        (B, heads, N, N), in fp32."""
        w = self.project(x).float()
        scores = torch.matmul(w, w.transpose(-1, -2)) * self.scale
        if is_causal:
            n = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool, device=w.device).triu(1), float("-inf"))
        return torch.softmax(scores, dim=-1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """(B, N, dim) -> (B, N, dim); is_causal: token i attends to tokens j <= i (CRATE-GPT). attn_mask
        (timm-style blocks pass one) is refused: MSSA attends over all tokens, or causally."""
        if attn_mask is not None:
            raise NotImplementedError("MSSA takes no attention mask: it attends over all tokens, or causally "
                                      "(is_causal=True)")
        return self.merge(self.attend(self.project(x), is_causal))               # w: (B, H, N, D), strided view

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


class CRATEBlock(Block):
    """One CRATE layer: compression (MSSA with residual), then sparsification (ISTA, no residual).
    z: (B, N, dim) -> (B, N, dim); sparsify's codes are the ISTA output itself."""

    codes_name = "ISTA output"

    def __init__(self, dim: int, heads: int, dim_head: int | None = None, step_size: float = 0.1,
                 lambd: float = 0.1, dropout: float = 0.0, impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MSSA(dim, heads, dim_head, dropout=dropout, impl=impl)
        self.norm2 = nn.LayerNorm(dim)
        self.ista = ISTA(dim, step_size=step_size, lambd=lambd, impl=impl)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z_half = z + self.attn(self.norm1(z))
        return self.ista(self.norm2(z_half))

    def sparsify(self, z_half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.ista(self.norm2(z_half))
        return out, out


def patch_grid(img: torch.Tensor, patch_size: tuple[int, int], in_chans: int) -> tuple[int, int]:
    """The patch grid (gh, gw) of (B, in_chans, H, W) images. Raises ValueError for another layout,
    channel count, or a size the patch does not divide."""
    if img.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(img.shape)}")
    _, c, h, w = img.shape
    p1, p2 = patch_size
    if c != in_chans:
        raise ValueError(f"expected {in_chans} input channels, got {c}")
    if h % p1 or w % p2:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p1}x{p2}")
    return h // p1, w // p2


class ODL(nn.Module):
    """CRATE-alpha's overcomplete dictionary learning block (Yang et al., "Scaling White-Box Transformers
    for Vision", NeurIPS 2024; the official port's ``OvercompleteISTABlock``). x: (..., dim) -> (..., dim):

        a1 = relu(eta x D - eta lambda);  a2 = relu(a1 - eta (a1 D^T - x) D - eta lambda);  out = a2 D1^T

    D, D1: (dim, ratio * dim) analysis and (decoupled) synthesis dictionaries. forward(x, residual)
    returns residual + out, with the add fused where the impl can (crate_fast.kernels.odl_step).
    recompute=True saves a fifth of the activation bytes for the backward, which then recomputes both
    codes (2 more GEMMs of 12); False (the default) is the faster step (odl_step).
    """

    def __init__(self, dim: int, overcomplete_ratio: int = 4, step_size: float = 0.1, lambd: float = 0.1,
                 impl: str = "auto", recompute: bool = False):
        super().__init__()
        self.D = nn.Parameter(torch.empty(dim, overcomplete_ratio * dim))
        self.D1 = nn.Parameter(torch.empty(dim, overcomplete_ratio * dim))
        self.step_size, self.lambd, self.recompute = step_size, lambd, recompute
        self.impl = check_impl(impl)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The JAX trainer's init (flax kaiming_uniform on a (dim, m) kernel: fan_in = dim), which trained
        # the published models: U(+-sqrt(6 / dim)). (The inference port's torch kaiming_uniform_ takes
        # fan_in = m = 4 dim, a 2x narrower range; it only ever loads trained weights.)
        bound = (6.0 / self.D.shape[0]) ** 0.5
        nn.init.uniform_(self.D, -bound, bound)
        nn.init.uniform_(self.D1, -bound, bound)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return odl_step(x, self.D, self.D1, self.step_size, self.lambd, residual=residual, recompute=self.recompute,
                        impl=self.impl)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse codes a2 (..., ratio * dim) of x, in fp32 (for the white-box analysis)."""
        return odl_codes_ref(x.float(), self.D.float(), self.step_size, self.lambd)

    def extra_repr(self) -> str:
        d, m = self.D.shape
        return (f"dim={d}, atoms={m}, step_size={self.step_size}, lambd={self.lambd}, recompute={self.recompute}, "
                f"impl={self.impl!r}")


class OvercompleteISTA(nn.Module):
    """CRATE-GPT's sparse coding (crate-lm crate_overcomplete.py's MLP): two non-negative ISTA steps from a
    zero code on an overcomplete dictionary tied between analysis and synthesis, W (ratio * dim x dim).
    x: (..., dim) -> (..., dim):

        a1 = relu(eta x W^T - eta lambda);  a2 = relu(a1 + eta (x W^T - a1 W W^T) - eta lambda);  out = a2 W

    which is crate_fast.kernels.odl_step(x, W^T, W^T) (D = D1 = W^T, no residual). Initialized
    kaiming-uniform as crate-lm (fan_in = dim: U(+-sqrt(6 / dim))). recompute: as ODL's."""

    def __init__(self, dim: int, overcomplete_ratio: int = 4, step_size: float = 0.1, lambd: float = 0.1,
                 impl: str = "auto", recompute: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(overcomplete_ratio * dim, dim))
        self.step_size, self.lambd, self.recompute = step_size, lambd, recompute
        self.impl = check_impl(impl)
        nn.init.kaiming_uniform_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.weight.t()                                              # (dim, atoms): D = D1, a view
        return odl_step(x, d, d, self.step_size, self.lambd, residual=None, recompute=self.recompute,
                        impl=self.impl)

    @torch.no_grad()
    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The sparse codes a2 (..., ratio * dim) of x, in fp32 or wider (for the analysis, interventions)."""
        work = torch.promote_types(x.dtype, torch.float32)
        return odl_codes_ref(x.to(work), self.weight.t().to(work), self.step_size, self.lambd)

    def extra_repr(self) -> str:
        m, d = self.weight.shape
        return (f"dim={d}, atoms={m}, step_size={self.step_size}, lambd={self.lambd}, recompute={self.recompute}, "
                f"impl={self.impl!r}")


class CRATEAlphaBlock(Block):
    """One CRATE-alpha layer: ``z_half = z + MSSA(LN1(z)); z_next = z_half + ODL(LN2(z_half))``.

    Both MSSA projections are bias-free and every LayerNorm has eps 1e-6 (the official port and the JAX
    model). drop_path > 0 drops each residual branch per sample (timm's DropPath, as the JAX trainer's
    DropPath on both branches; timm must be installed for it). sparsify's codes are the ODL codes a2
    (B, N, ratio * dim) fp32, not the block's output (z_half + a2 D1^T: a residual sum, dense)."""

    codes_name = "ODL codes a2"

    def __init__(self, dim: int, heads: int, dim_head: int | None = None, overcomplete_ratio: int = 4,
                 step_size: float = 0.1, lambd: float = 0.1, dropout: float = 0.0, drop_path: float = 0.0,
                 impl: str = "auto"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MSSA(dim, heads, dim_head, dropout=dropout, impl=impl, out_bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.odl = ODL(dim, overcomplete_ratio, step_size=step_size, lambd=lambd, impl=impl)
        if drop_path > 0:
            from timm.layers import DropPath

            self.drop_path = DropPath(drop_path)
        else:
            self.drop_path = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.drop_path is None or not self.training:
            z_half = z + self.attn(self.norm1(z))
            return self.odl(self.norm2(z_half), residual=z_half)     # the residual add rides in the op
        z_half = z + self.drop_path(self.attn(self.norm1(z)))
        return z_half + self.drop_path(self.odl(self.norm2(z_half)))

    def sparsify(self, z_half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xn = self.norm2(z_half)
        return self.odl(xn, residual=z_half), self.odl.codes(xn)


class ConvPatchEmbed(nn.Module):
    """Conv2d(in_chans, dim, kernel = stride = patch, bias) patch embedding: (B, C, H, W) -> (B, gh*gw,
    dim), patches in row-major grid order (the CRATE-alpha stem, timm's and FAIR MAE's PatchEmbed)."""

    def __init__(self, patch_size: tuple[int, int], in_chans: int, dim: int):
        super().__init__()
        self.patch_size, self.in_chans = tuple(patch_size), in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=self.patch_size, stride=self.patch_size)

    def grid(self, img: torch.Tensor) -> tuple[int, int]:
        return patch_grid(img, self.patch_size, self.in_chans)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        self.grid(img)
        return self.proj(img).flatten(2).transpose(1, 2)


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
        return patch_grid(img, self.patch_size, self.in_chans)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        gh, gw = self.grid(img)
        B, C = img.shape[:2]
        p1, p2 = self.patch_size
        x = img.reshape(B, C, gh, p1, gw, p2).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, p1 * p2 * C)
        return self.norm_out(self.proj(self.norm_in(x)))


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int],
                       new_grid: tuple[int, int], method: str = "size") -> torch.Tensor:
    """Resize a (1, 1 + gh*gw, C) position table with a leading CLS row to a new patch grid.

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
      "zoom": scipy.ndimage.zoom(order=1) of the grid, which CRATE-alpha's JAX code uses when it
          finetunes at another grid (official models/crate.py resample_posemb): bilinear with the corner
          rows mapped onto each other, F.interpolate(mode="bilinear", align_corners=True).
    Raises ValueError for an unknown method or a table whose patch rows are not gh * gw."""
    if method not in ("size", "dino", "zoom"):
        raise ValueError(f"method must be 'size', 'dino' or 'zoom', got {method!r}")
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
    elif method == "zoom":
        grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=True)
    else:
        scale = ((new_grid[0] + 0.1) / old_grid[0], (new_grid[1] + 0.1) / old_grid[1])
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False,
                             recompute_scale_factor=False)
        if tuple(grid.shape[-2:]) != tuple(new_grid):      # cannot happen: floor(g * (n + 0.1) / g) = n
            raise RuntimeError(f"DINO interpolation gave a {tuple(grid.shape[-2:])} grid, not {tuple(new_grid)}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], C).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


def resize_patch_kernel(weight: torch.Tensor, patch_size: tuple[int, int]) -> torch.Tensor:
    """A (dim, C, p, q) convolutional stem kernel resized bilinearly to (dim, C, *patch_size), as
    CRATE-alpha's JAX loader does when a checkpoint of another patch size seeds a fine-tuning
    (``jax.image.resize(kernel, shape, "bilinear")``, official models/common.py merge_params): half-pixel
    centers, antialiased when shrinking. 16-bit kernels are resized in fp32; returns weight's dtype."""
    work = torch.promote_types(weight.dtype, torch.float32)
    out = F.interpolate(weight.to(work), size=tuple(patch_size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.to(weight.dtype)
