"""Import and export of official CRATE checkpoints (Ma-Lab-Berkeley/CRATE ``model/crate.py`` keys).

Loading is strict: any missing key, unexpected key or shape mismatch raises one error that lists
them all. The official finetune.py loads with strict=False under a 'module.' prefix mismatch and
silently keeps random weights; this never does.
"""
from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch

from .layers import resample_pos_embed
from .model import CRATE

# crate_fast name <-> official name. Block-level parts are mapped inside transformer.layers.{i}.
_TOP = {
    "cls_token": "cls_token",
    "pos_embed": "pos_embedding",
    "patch_embed.norm_in.": "to_patch_embedding.1.",
    "patch_embed.proj.": "to_patch_embedding.2.",
    "patch_embed.norm_out.": "to_patch_embedding.3.",
    "head_norm.": "mlp_head.0.",
    "head.": "mlp_head.1.",
}
_BLOCK = {
    "norm1.": "0.norm.",
    "attn.qkv.": "0.fn.qkv.",
    "attn.out.": "0.fn.to_out.0.",
    "norm2.": "1.norm.",
    "ista.": "1.fn.",
}
_OURS_BLOCK = re.compile(r"^blocks\.(\d+)\.(.*)$")
_OFFICIAL_BLOCK = re.compile(r"^transformer\.layers\.(\d+)\.(.*)$")
_STRIP_PREFIXES = ("module.", "_orig_mod.")   # DataParallel/DDP, torch.compile


def _translate(key: str, top: dict[str, str], block: dict[str, str], block_re: re.Pattern,
               block_fmt: str) -> str | None:
    m = block_re.match(key)
    if m:
        idx, rest = m.groups()
        for src, dst in block.items():
            if rest.startswith(src):
                return block_fmt.format(idx) + dst + rest[len(src):]
        return None
    for src, dst in top.items():
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src):]
    return None


def official_key(key: str) -> str | None:
    """crate_fast parameter name -> official name (None if it has no official counterpart)."""
    return _translate(key, _TOP, _BLOCK, _OURS_BLOCK, "transformer.layers.{}.")


def crate_fast_key(key: str) -> str | None:
    """Official parameter name -> crate_fast name (None if unknown)."""
    inv_top = {v: k for k, v in _TOP.items()}
    inv_block = {v: k for k, v in _BLOCK.items()}
    return _translate(key, inv_top, inv_block, _OFFICIAL_BLOCK, "blocks.{}.")


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """A state_dict from a path, a raw state_dict, or a checkpoint dict holding 'state_dict' / 'model'.

    Strips the 'module.' prefix of DataParallel/DDP checkpoints (and torch.compile's '_orig_mod.').
    """
    if isinstance(obj, (str, os.PathLike)):
        obj = torch.load(obj, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict or checkpoint dict, got {type(obj).__name__}")
    for wrapper in ("state_dict", "model"):
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    out = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"checkpoint entry {k!r} is a {type(v).__name__}, not a tensor; "
                            "pass the model's state_dict (or a dict holding it under 'state_dict'/'model')")
        for p in _STRIP_PREFIXES:
            while k.startswith(p):
                k = k[len(p):]
        out[k] = v
    return out


def _square_grid(n: int, key: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{key} has {n} patch positions, not a square grid; cannot interpolate")
    return side, side


def load_official_state_dict(model: CRATE, obj: Any, *, reset_head: bool = False) -> CRATE:
    """Load official CRATE weights into a crate_fast model, strictly.

    obj: a path, a state_dict, or a checkpoint dict with 'state_dict' (main.py) or 'model' (demo
    notebooks); 'module.' prefixes are stripped. The position table is bicubically interpolated when
    the checkpoint's patch grid differs from the model's. ``reset_head=True`` keeps the model's own
    (freshly initialised) classifier, for finetuning on another class count. Returns the model.
    """
    sd = unwrap_state_dict(obj)
    if sd and all(k in model.state_dict() for k in sd):
        raise ValueError("this is already a crate_fast state_dict: use model.load_state_dict(sd)")
    ours = model.state_dict()
    mapped, unexpected, mismatched, seen = {}, [], [], set()
    for k, v in sd.items():
        name = crate_fast_key(k)
        if name is None or name not in ours:
            unexpected.append(k)
            continue
        seen.add(name)
        if reset_head and name.startswith("head."):
            continue
        if name == "pos_embed" and v.dim() == 3 and v.shape[1] != ours[name].shape[1]:
            v = resample_pos_embed(v, _square_grid(v.shape[1] - 1, k), model.config.grid_size)
        if v.shape != ours[name].shape:
            mismatched.append(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[name].shape)}")
            continue
        mapped[name] = v
    skipped = {n for n in ours if reset_head and n.startswith("head.")}
    missing = [official_key(n) for n in ours if n not in seen and n not in skipped]
    if missing or unexpected or mismatched:
        lines = ["official checkpoint does not match this model (nothing was loaded):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                             + (" ..." if len(items) > 20 else ""))
        if mismatched and any("mlp_head.1" in m for m in mismatched):
            lines.append("  (a different class count? pass reset_head=True to keep a new head)")
        raise RuntimeError("\n".join(lines))
    if skipped:
        mapped.update({n: ours[n] for n in skipped})
    model.load_state_dict(mapped, strict=True)
    return model


def to_official_state_dict(model: CRATE) -> OrderedDict[str, torch.Tensor]:
    """The model's parameters under official ``model/crate.py`` names (no 'module.' prefix)."""
    out = OrderedDict()
    for k, v in model.state_dict().items():
        name = official_key(k)
        if name is None:
            raise KeyError(f"parameter {k!r} has no official counterpart")
        out[name] = v
    return out
