"""What every CRATE-family model shares (:class:`CRATEModel`: impl switching, gradient checkpointing, one
block loop) and what the image classifiers share (:class:`TokenClassifier`: embedding, pooling, head,
timm's model contract). A classifier family subclasses TokenClassifier and builds ``patch_embed`` (with a
``grid(img)`` method), ``pos_embed``, ``cls_token``, ``pos_drop``, ``blocks``, ``head_norm`` and ``head``
in its __init__.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from crate_fast.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..layers import Block, resample_pos_embed, set_impl

# Pooling of a token sequence (B, 1 + N, dim): "cls" the CLS token; "mean" the mean of the tokens (every
# token in the classifiers, as the official CRATE; the patch tokens in CRATE-MAE, as FAIR MAE's global
# pool); "none" (classifiers) no pooling: the head reads every token (timm's global_pool="").
POOLS = ("cls", "mean")
CLASSIFIER_POOLS = (*POOLS, "none")
# timm's global_pool names -> ours
GLOBAL_POOLS = {"token": "cls", "avg": "mean", "cls": "cls", "mean": "mean", "": "none", "none": "none"}


# What CRATEModel's Hugging Face Hub methods call: crate_fast.hub, which needs the family registry and the
# loader above models/ and so installs itself here (provide_hub) when `import crate_fast` runs, as every use
# of this module does first (docs/DESIGN.md §1, §12).
_HUB = None


def provide_hub(implementation) -> None:
    """Install what save_pretrained / from_pretrained / push_to_hub call (crate_fast.hub does, at import)."""
    global _HUB
    _HUB = implementation


def _hub():
    if _HUB is None:
        raise RuntimeError("crate_fast.hub is not loaded: import crate_fast")
    return _HUB


def pool_for(global_pool: str) -> str:
    """Our pool for timm's global_pool name. Raises ValueError for any other name."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {sorted(GLOBAL_POOLS)}, got {global_pool!r}")
    return GLOBAL_POOLS[global_pool]


class CRATEModel(nn.Module):
    """The base of every family's model: ``config`` (a frozen dataclass with ``impl``), the impl switch,
    gradient checkpointing and the one loop that runs a list of blocks."""

    config: object
    grad_checkpointing: bool = False

    @property
    def impl(self) -> str:
        return self.config.impl

    def set_impl(self, impl: str):
        """Use another MSSA/ISTA/ODL implementation from now on (one of crate_fast.kernels.IMPLS).
        Returns the model. Raises ValueError for an unknown impl."""
        set_impl(self, impl)
        self.config = self.config.replace(impl=impl)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block during the backward instead of keeping its activations (timm's switch):
        the same gradients for one more forward of the blocks."""
        self.grad_checkpointing = enable

    def run_block(self, blk: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
        """One block, checkpointed while training with grad_checkpointing on (only its input is kept).
        A block compiled by train.py --compile runs compiled while training (fixed batches); evaluation and
        generation call its eager forward (their last batch is partial and generation passes a cache: a
        compiled block would recompile for each, and a dynamic-batch graph measured ~30x slower on CPU)."""
        if blk._compiled_call_impl is not None and not self.training:
            return blk._call_impl(x, **kwargs)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(blk, x, use_reentrant=False, **kwargs)
        return blk(x, **kwargs)

    def repeated_blocks(self) -> list[nn.Module]:
        """Every block of the model (encoder and decoder): the regions train.py --compile compiles one by
        one (torchtitan's per-block compile: identical blocks share one compiled graph)."""
        return [m for m in self.modules() if isinstance(m, Block)]

    def run_blocks(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for blk in blocks:
            x = self.run_block(blk, x)
        return x

    def no_weight_decay(self) -> set[str]:
        """Parameter names that recipes may exclude from weight decay (timm convention)."""
        return set()

    # The Hugging Face Hub (crate_fast.hub; huggingface_hub's PyTorchModelHubMixin interface, our own keys)
    def save_pretrained(self, save_directory, *, push_to_hub: bool = False, repo_id: str | None = None,
                        **push_to_hub_kwargs):
        """Write config.json (the config fields and the family) and model.safetensors (our keys; the family and
        config in its metadata) to a folder, optionally pushing it: crate_fast.hub.save_pretrained."""
        return _hub().save_pretrained(self, save_directory, push_to_hub=push_to_hub, repo_id=repo_id,
                                      **push_to_hub_kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload save_pretrained's files to a Hub repository: crate_fast.hub.push_to_hub."""
        return _hub().push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The model of this class a folder (save_pretrained's, a train.py run's) or Hub repository holds,
        loaded strictly: crate_fast.hub.from_pretrained (TypeError for a model of another class)."""
        return _hub().from_pretrained(pretrained_model_name_or_path, model_class=cls, **kwargs)


class TokenClassifier(CRATEModel):
    """Images -> embed (CLS + patch tokens) -> blocks -> pool (CLS token or mean) -> LN -> Linear.

    Subclasses set ``config`` (a frozen dataclass with dim, num_classes, pool, impl, grid_size,
    patch_size) and the modules named in the module docstring, then call :meth:`_init_contract`.
    """

    def _init_contract(self) -> None:
        """timm's model contract (crate_fast.timm_models): sizes and the feature map of every block."""
        cfg = self.config
        self.num_features = self.head_hidden_size = self.embed_dim = cfg.dim
        self.num_prefix_tokens = 1
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=cfg.dim, reduction=cfg.patch_size[0])
                             for i in range(cfg.depth)]

    def embed(self, img: torch.Tensor, pos_interp: str = "size") -> torch.Tensor:
        """(B, C, H, W) images -> (B, 1 + patches, dim) tokens entering the first block. `pos_interp`
        chooses how the position table is resized off the config's grid (pos_embed_for's `method`)."""
        grid = self.patch_embed.grid(img)
        x = self.patch_embed(img)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.pos_embed_for(grid, pos_interp)
        return self.pos_drop(x)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def pos_embed_for(self, grid: tuple[int, int], method: str = "size") -> torch.Tensor:
        """The (1, 1 + gh * gw, dim) position table for a patch grid (gh, gw): the table itself on the
        config's grid, else bicubic-interpolated by `method` ("size", the default for training and
        inference, or "dino", the CRATE notebooks' DINO formula; see layers.resample_pos_embed)."""
        return resample_pos_embed(self.pos_embed, self.config.grid_size, grid, method)

    def forward_features(self, img: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block: (B, 1 + patches, dim). No final norm: the head's LayerNorm follows
        pooling (both official models)."""
        return self.run_blocks(self.blocks, self.embed(img))

    def forward_head(self, tokens: torch.Tensor, pre_logits: bool = False, pool: str | None = None) -> torch.Tensor:
        """(B, 1 + patches, dim) tokens -> (B, num_classes) logits; pre_logits=True: the normalized pooled
        (B, dim) features the classifier reads (timm's contract). pool: "cls" or "mean" (every token, CLS
        included, as the official CRATE) instead of the config's; the config's "none" keeps every token
        ((B, 1 + patches, ...) out). Raises ValueError for another pool."""
        pool = self.config.pool if pool is None else pool
        if pool not in CLASSIFIER_POOLS:
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if pool != "none":
            tokens = tokens.mean(dim=1) if pool == "mean" else tokens[:, 0]
        x = self.head_norm(tokens)
        return x if pre_logits else self.head(x)

    def pooled(self, img: torch.Tensor, pool: str | None = None) -> torch.Tensor:
        """(B, in_chans, H, W) images -> (B, dim) pre-logit features (linear probes), pooled by `pool`
        (default: the config's)."""
        return self.forward_head(self.forward_features(img), pre_logits=True, pool=pool)

    def forward_intermediates(self, img: torch.Tensor, indices: int | list[int] | None = None, *,
                              norm: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False,
                              return_prefix_tokens: bool = False, stop_early: bool = False):
        """timm's forward_intermediates: the tokens leaving the selected blocks (indices: the last n blocks
        for an int, else block numbers, negative from the end; default all). output_fmt "NCHW" gives
        (B, dim, h, w) patch maps, "NLC" (B, patches, dim) tokens; return_prefix_tokens adds the CLS token
        (B, 1, dim) to each. norm is refused (the final LayerNorm follows pooling). Returns
        (final tokens (B, 1 + patches, dim), list) or the list alone with intermediates_only."""
        if norm:
            raise ValueError(f"{type(self).__name__} has no final norm on its tokens (the classifier's LayerNorm "
                             "follows pooling)")
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take = self.block_indices(indices)
        depth = len(self.blocks)
        gh, gw = self.patch_embed.grid(img)
        x, out = self.embed(img), []
        last = max(take) if stop_early else depth - 1
        for i, blk in enumerate(self.blocks[: last + 1]):
            x = self.run_block(blk, x)
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

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for num_classes (0: none, forward returns pre-logits); global_pool
        "token"/"avg"/"" (timm) or "cls"/"mean"/"none" also switches the pooling."""
        pool = self.config.pool if global_pool is None else pool_for(global_pool)
        self.config = self.config.replace(num_classes=num_classes, pool=pool)
        device, dtype = self.head_norm.weight.device, self.head_norm.weight.dtype
        self.head = nn.Linear(self.config.dim, num_classes, device=device, dtype=dtype) if num_classes \
            else nn.Identity()

    # timm's pretrained_cfg: computed from the config until timm (or a user) sets one.
    @property
    def pretrained_cfg(self) -> dict:
        """timm's data config of this model (timm.data.resolve_data_config reads it): input size, ImageNet
        mean/std, crop_pct and interpolation of the official evaluation (resize 256 -> center 224,
        bicubic), the classifier name. timm's builder assigns its own (with the weights' source)."""
        set_ = self.__dict__.get("_pretrained_cfg")
        if set_ is not None:
            return set_
        cfg = self.config
        return {"input_size": (cfg.in_chans, *cfg.img_size), "mean": IMAGENET_DEFAULT_MEAN,
                "std": IMAGENET_DEFAULT_STD, "crop_pct": DEFAULT_CROP_PCT, "crop_mode": "center",
                "interpolation": "bicubic", "num_classes": cfg.num_classes, "classifier": "head",
                # the first layer over pixels (CRATE: a Linear on channel-last patches; CRATE-alpha: a conv)
                "first_conv": "patch_embed.proj", "license": "mit"}

    @pretrained_cfg.setter
    def pretrained_cfg(self, value: dict) -> None:
        self.__dict__["_pretrained_cfg"] = value

    default_cfg = pretrained_cfg

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(img))

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed"}
