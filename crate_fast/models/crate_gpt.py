"""CRATE-GPT, the white-box causal language models of crate-lm (crate-lm/crate-lm @3d5027b: crate.py and
crate_overcomplete.py, nanoGPT-based), exactly their math; docs/DESIGN.md §2.4.

    token ids -> wte (tied to the head) + wpe (learned positions) -> dropout
    -> depth x CRATEGPTBlock:  z_half = z + MSSA_causal(LN1(z));  z_next = ISTA(LN2(z_half))   (no residual)
    -> LN_f (overcomplete only) -> logits = z E^T

Two variants of the sparse-coding step (eta = lambda = 0.1):
    "overcomplete" (the released weights; crate_overcomplete.py): W (4d x d), two ISTA steps from zero,
        a1 = relu(eta v W^T - eta lambda), a2 = relu(a1 + eta (v W^T - a1 W W^T) - eta lambda), out = a2 W:
        exactly crate_fast.kernels.odl_step(v, W^T, W^T, residual=None) (layers.OvercompleteISTA);
    "square" (the book's Causal-CRATE-Base; crate.py): CRATE's step relu(v + eta (v W - v W^T W) - eta lambda),
        W (d x d): exactly crate_fast.kernels.ista_step (layers.ISTA); no final LayerNorm.
MSSA is CRATE's tied attention (one bias-free projection U = c_attn, q = k = v = w per head, scores
w w^T / sqrt(p)) under a causal mask, with an output projection with bias (c_proj) even for one head.
Generation keeps a tied KV cache: one w per token per layer (d values), half of GPT-2's K + V.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..io import Weights
from ..kernels import check_impl
from ..layers import ISTA, MSSA, Block, OvercompleteISTA
from . import _flops
from ._config import ConfigBase, check_dropout, check_positive
from .base import CRATEModel
from .family import Family
from .keys import KeyMap

VARIANTS = ("overcomplete", "square")
SITES = ("attn", "ista")

# crate-lm's model sizes (crate_overcomplete.py's preset table: crate, crate-medium, crate-large, crate-xl)
# and a CPU size for the byte-level demo (vocab 256, context 128).
PRESETS: dict[str, dict] = {
    "crate_gpt_tiny": dict(dim=128, depth=4, heads=4, vocab_size=256, block_size=128),
    "crate_gpt_base": dict(dim=768, depth=12, heads=12),
    "crate_gpt_medium": dict(dim=1024, depth=24, heads=16),
    "crate_gpt_large": dict(dim=1280, depth=36, heads=20),
    "crate_gpt_xl": dict(dim=1600, depth=48, heads=25),
}


@dataclass(frozen=True)
class CRATEGPTConfig(ConfigBase):
    """Everything that defines a CRATE-GPT (crate-lm's GPTConfig names in brackets).

    dim [n_embd], depth [n_layer], heads [n_head] (dim divisible by heads), vocab_size (50304: GPT-2's
    50257 padded to a multiple of 64), block_size (the context, 1024; wpe has that many rows), variant
    ("overcomplete": the released model, or "square"), step_size / lambd (eta and lambda of the ISTA steps,
    0.1 in crate-lm), dropout (embedding, attention and residual dropout; 0 in crate-lm's recipes), impl
    (crate_fast.kernels.IMPLS; it never changes parameters), recompute (the memory-lean backward: the
    attention saves each row's log-sum-exp instead of its probabilities and the overcomplete sparse coding
    saves its input and first residual instead of both codes, recomputing them: about half of crate-lm's
    activation bytes for a slower step; bench_gpt.py measures both. It changes what impl="torch" saves,
    and the sparse coding's bytes under impl="triton" (whose attention never saves the probabilities);
    impl="reference" and attention dropout while training run autograd of the reference, which it does
    not change). Raises ValueError on any invalid field."""

    dim: int
    depth: int
    heads: int
    vocab_size: int = 50304
    block_size: int = 1024
    variant: str = "overcomplete"
    step_size: float = 0.1
    lambd: float = 0.1
    dropout: float = 0.0
    impl: str = "auto"
    recompute: bool = False

    def __post_init__(self):
        check_positive(self, "dim", "depth", "heads", "vocab_size", "block_size")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")
        check_dropout(self, "dropout")
        check_impl(self.impl)

    @property
    def dim_head(self) -> int:
        return self.dim // self.heads


def flops(cfg: CRATEGPTConfig, *, training: bool = False, seq_len: int | None = None) -> int:
    """Matmul FLOPs per token in a context of seq_len tokens (default block_size; docs/DESIGN.md §6): per
    layer the causal MSSA (projections 4 d^2, attention 4 T d halved by the mask), the sparse coding
    (overcomplete: four d x 4d GEMMs, 32 d^2; square: the two-GEMM ISTA, 4 d^2), and the tied head 2 d V.
    crate-lm's estimate_mfu counts 6N + 12LHQT per token (its forward as 2N), which under-counts the
    overcomplete step: each of its 4 d^2 weights is used four times per token. training: x3."""
    t, d = seq_len or cfg.block_size, cfg.dim
    code = _flops.odl(t, d, 4 * d) if cfg.variant == "overcomplete" else _flops.ista(t, d)
    per_sequence = cfg.depth * (_flops.mssa(t, d, d, causal=True) + code) + 2 * t * d * cfg.vocab_size
    return _flops.total(per_sequence // t, training)


@dataclass
class Intervention:
    """The neuron intervention of the CRATE-GPT paper (crate-lm's ``enhanced_feature_id``): overwrite one
    coordinate `feature` with `value` in block `layer`, at every position, before it is used.

    site "attn": the attention's w = LN1(z) U (B, T, dim) before the head split (it changes the scores and
    the values, q = k = v); site "ista": the sparse code a2 (B, T, 4 dim) before the synthesis a2 W
    (overcomplete), or the ISTA output (B, T, dim) itself (square). crate-lm takes the tuple (feature,
    value, layer, site), with any site other than 'attn' meaning the ISTA block; so do forward/generate."""

    feature: int
    value: float
    layer: int
    site: str = "attn"

    @classmethod
    def of(cls, spec) -> Intervention | None:
        """An Intervention from itself, crate-lm's tuple (feature, value, layer, site), or None."""
        if spec is None or isinstance(spec, Intervention):
            return spec
        feature, value, layer, site = spec
        return cls(int(feature), float(value), int(layer), "attn" if site == "attn" else "ista")


class CRATEGPTBlock(Block):
    """One CRATE-GPT layer (crate-lm's Block): ``z_half = z + MSSA(LN1(z), causal)``,
    ``z_next = ISTA(LN2(z_half))`` (no residual). z: (B, T, dim) -> (B, T, dim). LayerNorm eps 1e-5 with
    bias (crate-lm's prenorm_1 / prenorm_2). sparsify's codes: the ISTA output (square) or the sparse
    code a2 (overcomplete)."""

    def __init__(self, cfg: CRATEGPTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        # crate-lm's c_proj exists for every head count (MSSA skips it only for one head spanning the width)
        self.attn = MSSA(cfg.dim, cfg.heads, dropout=cfg.dropout, impl=cfg.impl, out_proj=True,
                         recompute=cfg.recompute)
        self.norm2 = nn.LayerNorm(cfg.dim)
        if cfg.variant == "overcomplete":
            self.ista = OvercompleteISTA(cfg.dim, 4, step_size=cfg.step_size, lambd=cfg.lambd, impl=cfg.impl,
                                         recompute=cfg.recompute)
        else:
            self.ista = ISTA(cfg.dim, step_size=cfg.step_size, lambd=cfg.lambd, impl=cfg.impl)
        self.codes_name = "sparse codes a2" if cfg.variant == "overcomplete" else "ISTA output"

    def forward(self, z: torch.Tensor, cache: TiedCache | None = None, layer: int = 0,
                intervention: Intervention | None = None) -> torch.Tensor:
        """cache: the tied KV cache of generation (this layer's slot `layer`); intervention: applied when
        its layer is `layer`."""
        edit = intervention if intervention is not None and intervention.layer == layer else None
        x = self.norm1(z)
        if cache is None and edit is None:
            z_half = z + self.attn(x, is_causal=True)
        else:
            w = self.attn.project(x)                                           # (B, H, T, p)
            if edit is not None and edit.site == "attn":
                w = _overwrite_head_coordinate(w, edit)
            o = self.attn.attend(w, is_causal=True) if cache is None else cache.attend(layer, w, self.attn.scale)
            z_half = z + self.attn.merge(o)
        if edit is None or edit.site != "ista":
            return self.ista(self.norm2(z_half))
        return self._edited_ista(self.norm2(z_half), edit)

    def compress(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.attn(self.norm1(z), is_causal=True)

    def _edited_ista(self, v: torch.Tensor, edit: Intervention) -> torch.Tensor:
        if isinstance(self.ista, OvercompleteISTA):
            a2 = self.ista.codes(v).to(v.dtype).clone()
            a2[..., edit.feature] = edit.value
            return F.linear(a2, self.ista.weight.t())                          # a2 W
        out = self.ista(v).clone()
        out[..., edit.feature] = edit.value
        return out

    def sparsify(self, z_half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.norm2(z_half)
        out = self.ista(v)
        return out, (self.ista.codes(v) if isinstance(self.ista, OvercompleteISTA) else out)


def _overwrite_head_coordinate(w: torch.Tensor, edit: Intervention) -> torch.Tensor:
    """w (B, H, T, p) with coordinate `feature` of the concatenated heads set to `value` (a copy)."""
    w = w.clone()
    w[:, edit.feature // w.shape[-1], :, edit.feature % w.shape[-1]] = edit.value
    return w


class TiedCache:
    """The tied KV cache of generation: per layer one w per token (B, H, T, p), the keys and the values
    (q = k = v), preallocated for block_size tokens. ``attend(layer, w, scale)`` appends this step's w
    (B, H, t, p) and attends its t new positions to every cached one before them (causal)."""

    def __init__(self, depth: int, batch: int, heads: int, block_size: int, dim_head: int, like: torch.Tensor):
        self.w = like.new_empty(depth, batch, heads, block_size, dim_head)
        self.length = [0] * depth

    def attend(self, layer: int, w: torch.Tensor, scale: float) -> torch.Tensor:
        start, t = self.length[layer], w.shape[2]
        self.w[layer, :, :, start:start + t] = w
        self.length[layer] = start + t
        keys = self.w[layer, :, :, :start + t]
        # query i (absolute position start + i) sees keys 0..start + i
        mask = torch.ones(t, start + t, dtype=torch.bool, device=w.device).tril(start)
        return F.scaled_dot_product_attention(w, keys, keys, attn_mask=mask, scale=scale)


class CRATEGPT(CRATEModel):
    """A CRATE-GPT language model (module docstring). ``logits, loss = model(idx, targets=None)`` as nanoGPT's,
    with logits at every position; ``generate`` samples with the tied KV cache.

    Same seed, same initial weights as crate-lm: modules are created in its order with its initializers
    (nn.Linear / nn.Embedding N(0, 0.02) and zero biases, every c_proj weight N(0, 0.02 / sqrt(2 depth)),
    the ISTA dictionaries kaiming-uniform, U(+-sqrt(6 / dim))); the head is tied to wte."""

    config_class = CRATEGPTConfig
    # crate-lm's names (transformer.*, lm_head): ours -> theirs (models/keys.py)
    official_keys = KeyMap(
        top={"wte.": "transformer.wte.", "wpe.": "transformer.wpe.", "ln_f.": "transformer.ln_f.",
             "lm_head.": "lm_head."},
        blocks={"blocks.": ("transformer.h.", {"norm1.": "prenorm_1.", "attn.qkv.": "attn.c_attn.",
                                               "attn.out.": "attn.c_proj.", "norm2.": "prenorm_2.",
                                               "ista.": "ista."})},
    )
    # The square model's checkpoints carry each layer's causal-mask buffer (crate.py registers a persistent
    # tril(ones) 'attn.bias'): constants, not weights; the loader skips them by this rule (and says so).
    official_buffers = (r"transformer\.h\.\d+\.attn\.bias",)
    tied_keys = {"lm_head.weight": "wte.weight"}          # one tensor under two names (files may hold one)
    head_keys = ()
    resampled_pos_keys = ()

    def __init__(self, config: CRATEGPTConfig):
        super().__init__()
        self.config = cfg = config
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.block_size, cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(CRATEGPTBlock(cfg) for _ in range(cfg.depth))
        self.ln_f = nn.LayerNorm(cfg.dim) if cfg.variant == "overcomplete" else None
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        self.num_features = cfg.dim
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """crate-lm's _init_weights in its module order (wte's draw is overwritten by lm_head's, which it
        shares), then the c_proj weights."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.out.weight, std=0.02 / math.sqrt(2 * self.config.depth))

    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, T) token ids -> (B, T, dim) token + position embeddings (positions start..start + T - 1),
        after dropout. Raises ValueError for ids of another shape or dtype, or more than block_size
        positions."""
        if idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"expected token ids of shape (B, T), int64, got {idx.dtype} {tuple(idx.shape)}")
        t = idx.shape[1]
        if start + t > self.config.block_size:
            raise ValueError(f"{start + t} positions exceed block_size {self.config.block_size}")
        pos = torch.arange(start, start + t, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos))

    def forward_features(self, idx: torch.Tensor, intervention=None) -> torch.Tensor:
        """(B, T) ids -> (B, T, dim) features after the last block (and ln_f for the overcomplete model)."""
        edit, x = Intervention.of(intervention), self.embed(idx)
        if edit is None:
            x = self.run_blocks(self.blocks, x)
        else:
            for i, blk in enumerate(self.blocks):
                x = self.run_block(blk, x, layer=i, intervention=edit)
        return x if self.ln_f is None else self.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, enhanced_feature_id=None):
        """idx (B, T) int64 -> (logits (B, T, vocab_size), loss): the mean next-token cross-entropy against
        targets (B, T) (ignore_index -1, as crate-lm), or None without targets. enhanced_feature_id: an
        Intervention or crate-lm's tuple (feature, value, layer, site)."""
        logits = self.lm_head(self.forward_features(idx, enhanced_feature_id))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None, enhanced_feature_id=None) -> torch.Tensor:
        """idx (B, T) extended by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        Each step samples as crate-lm's generate does: last-position logits / temperature, the top_k
        largest kept, softmax, one torch.multinomial draw (from `generator`, default torch's global one:
        one seed gives crate-lm's tokens). The context is the last block_size tokens; within it every step
        runs only the new token against the tied KV cache, and the cache is rebuilt when the window slides
        (positions restart at 0, as crate-lm's cropping). Raises ValueError for temperature <= 0."""
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        edit, block = Intervention.of(enhanced_feature_id), self.config.block_size
        cache, logits = None, None
        for _ in range(max_new_tokens):
            if cache is None or idx.shape[1] > block:           # (re)fill the cache from the cropped context
                cache, ctx = self._cache_for(idx), idx[:, -block:]
                logits = self._decode(ctx, cache, 0, edit)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                logits[logits < v[:, [-1]]] = -float("inf")
            idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
            if idx.shape[1] <= block:
                logits = self._decode(idx_next, cache, idx.shape[1] - 1, edit)
            else:
                cache = None                                    # the window slides: recompute it next step
        return idx

    def _cache_for(self, idx: torch.Tensor) -> TiedCache:
        cfg = self.config
        return TiedCache(cfg.depth, idx.shape[0], cfg.heads, cfg.block_size, cfg.dim_head, self.wte.weight)

    def _decode(self, idx: torch.Tensor, cache: TiedCache, start: int, edit: Intervention | None) -> torch.Tensor:
        x = self.embed(idx, start)
        for i, blk in enumerate(self.blocks):
            x = self.run_block(blk, x, cache=cache, layer=i, intervention=edit)
        return self.lm_head(x if self.ln_f is None else self.ln_f(x))

    def no_weight_decay(self) -> set[str]:
        """crate-lm decays every parameter of two dimensions or more (train.py's wd_exclude then skips the
        1-D ones: LayerNorms and biases)."""
        return set()

    def check_file(self, w: Weights) -> None:
        """What no shape tells (crate_fast.checkpoint calls it on every load): a nanoGPT checkpoint's
        model_args name its head count. Raises ValueError when they name another than this model's."""
        args = (w.extra or {}).get("model_args")
        if isinstance(args, Mapping) and args.get("n_head", self.config.heads) != self.config.heads:
            raise ValueError(f"{w.source!r} was trained with n_head={args['n_head']} (its model_args), this model has "
                             f"heads={self.config.heads}: build it with heads={args['n_head']} (crate_fast.load_model "
                             "reads the model_args itself)")


def config_from_file(w: Weights, impl: str = "auto") -> CRATEGPTConfig | None:
    """The config of the model a crate-lm checkpoint describes (nanoGPT's container: 'model_args' =
    {n_layer, n_head, n_embd, block_size, vocab_size, dropout, bias}; bias is unused by both models), the
    variant told by the ISTA dictionary's shape (4d x d: overcomplete); None for another file."""
    args = (w.extra or {}).get("model_args")
    if not isinstance(args, Mapping) or not {"n_layer", "n_head", "n_embd"} <= set(args):
        return None
    dim, ista = int(args["n_embd"]), w.state_dict.get("transformer.h.0.ista.weight")
    variant = "square" if ista is not None and ista.shape[0] == dim else "overcomplete"
    return CRATEGPTConfig(dim=dim, depth=int(args["n_layer"]), heads=int(args["n_head"]),
                          vocab_size=int(args.get("vocab_size", 50304)), block_size=int(args.get("block_size", 1024)),
                          variant=variant, dropout=float(args.get("dropout", 0.0)), impl=impl)


FAMILY = Family(
    "crate_gpt", "CRATE-GPT", "crate-lm/crate-lm (CRATE-GPT; the CPAL 2024 paper and the CRATE book, ch. 7)",
    CRATEGPTConfig, CRATEGPT, PRESETS, flops, objective="language_modeling", inputs="tokens",
    train_fields=("impl", "dropout", "block_size", "recompute"), config_from_file=config_from_file)
