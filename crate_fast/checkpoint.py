"""The one place weights enter or leave a model: safe file reading, official key layouts, strict loading.

- :func:`read_checkpoint`: a ``.pt`` / ``.pth`` file through ``torch.load(weights_only=True)`` (tensors and
  plain containers only: nothing in the file runs) or a ``.safetensors`` file. A pickle that needs more
  is refused with an error naming the file and the opt-in for a file the user trusts.
- :func:`load_weights`: any weights for a crate_fast model (our own run checkpoints and state_dicts, or
  the official layout of the model's family), unwrapping the usual containers and prefixes.
- :func:`load_official_state_dict` / :func:`to_official_state_dict`: the official layout, both ways.
- :func:`save_weights`: our state_dict as ``.safetensors``.

Loading is strict: a missing key, an unexpected key or a shape mismatch raises one error listing them
all, and nothing is loaded. (The official finetune.py loads with strict=False under a 'module.' prefix
mismatch and silently keeps random weights; this never does.)
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .layers import resample_pos_embed, resize_patch_kernel

_WRAPPERS = ("state_dict", "model")            # main.py / train.py and FAIR MAE / the demo notebooks
_STRIP_PREFIXES = ("module.", "_orig_mod.")    # DataParallel/DDP, torch.compile


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded without running code from the file."""


# ---------------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------------
def read_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> Any:
    """The object stored in a checkpoint file, loaded onto the CPU.

    ``.safetensors``: a dict of tensors (the safetensors library). Anything else: ``torch.load`` with
    ``weights_only=True``, which restores tensors and plain Python containers and refuses any other
    object, so a file someone hands you cannot run code. ``trusted=True`` lifts that restriction for a
    file you made or trust (``torch.load(weights_only=False)``: the pickle may execute arbitrary code).

    Raises FileNotFoundError, UnsafeCheckpointError (the file needs ``trusted=True``) or ValueError (not
    a checkpoint at all).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a directory; pass a file in it (a run's best.pt, "
                                "last.pt or model.safetensors)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except SafetensorError as e:
            raise ValueError(f"{path!r} is not a readable .safetensors file ({e})") from e
    try:
        # FAIR-style checkpoints (MAE, DeiT) keep their training arguments as an argparse.Namespace: a
        # plain attribute bag, allowed explicitly.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as e:
        # weights_only refuses a pickle that names a global (a class or function) outside its
        # allow-list: that is what running code from a file takes. Any other failure is a broken file.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        detail = next((line for line in lines if "GLOBAL" in line), None)
        if trusted or detail is None:
            why = next((line for line in lines if "Unsupported" in line or "load key" in line), lines[0])
            raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({why})") from e
        raise UnsafeCheckpointError(
            f"{path!r} holds objects other than tensors and plain containers ({detail}); loading it would run "
            "code from the file, so it was refused. If you made this file or trust its source, load it with "
            "trusted=True (train.py and the analysis CLI: --trust-checkpoint).") from e
    except Exception as e:  # zip / legacy-pickle readers raise a zoo of errors on foreign or cut files
        raise ValueError(f"{path!r} is not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e


def unwrap_state_dict(obj: Any, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a path, a state_dict, or a checkpoint dict holding 'state_dict' or
    'model'; the 'module.' prefix of DataParallel/DDP and torch.compile's '_orig_mod.' are stripped.

    Raises TypeError when obj is none of these (an entry that is not a tensor, say)."""
    if isinstance(obj, (str, os.PathLike)):
        obj = read_checkpoint(obj, trusted=trusted)
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict or checkpoint dict, got {type(obj).__name__}")
    for wrapper in _WRAPPERS:
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


# ---------------------------------------------------------------------------------------------------
# Official key layouts
# ---------------------------------------------------------------------------------------------------
class KeyMap:
    """crate_fast parameter names <-> a family's official names.

    top: renames of whole keys or of key prefixes (ending in '.'); blocks: for each of our block lists
    (e.g. 'blocks.'), the official list prefix and the renames inside one block. Each model family
    declares its map as the class attribute ``official_keys``.
    """

    def __init__(self, top: dict[str, str], blocks: dict[str, tuple[str, dict[str, str]]]):
        self.top, self.blocks = top, blocks
        # the same renames read backwards, built once (from_official runs for every key of a file)
        self._top_inv = {v: k for k, v in top.items()}
        self._blocks_inv = {dst: (src, {v: k for k, v in inner.items()}) for src, (dst, inner) in blocks.items()}

    @staticmethod
    def _rename(key: str, top: dict[str, str], blocks: dict[str, tuple[str, dict[str, str]]]) -> str | None:
        for src_list, (dst_list, inner) in blocks.items():
            m = re.match(re.escape(src_list) + r"(\d+)\.(.*)$", key)
            if m:
                idx, rest = m.groups()
                for src, dst in inner.items():
                    if rest.startswith(src):
                        return f"{dst_list}{idx}.{dst}{rest[len(src):]}"
                return None
        for src, dst in top.items():
            if key == src or (src.endswith(".") and key.startswith(src)):
                return dst + key[len(src):]
        return None

    def to_official(self, key: str) -> str | None:
        """Our name -> the official one (None if it has no official counterpart)."""
        return self._rename(key, self.top, self.blocks)

    def from_official(self, key: str) -> str | None:
        """Official name -> ours (None if unknown)."""
        return self._rename(key, self._top_inv, self._blocks_inv)


def _key_map(model: nn.Module) -> KeyMap:
    keys = getattr(model, "official_keys", None)
    if keys is None:
        raise TypeError(f"{type(model).__name__} has no official key layout (official_keys)")
    return keys


def official_key(model: nn.Module, key: str) -> str | None:
    """The official name of one of the model's parameters (None if it has none)."""
    return _key_map(model).to_official(key)


def crate_fast_key(model: nn.Module, key: str) -> str | None:
    """The model's name for an official parameter name (None if unknown)."""
    return _key_map(model).from_official(key)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
def _square_grid(n: int, key: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{key} has {n} patch positions, not a square grid; cannot interpolate")
    return side, side


class _Layout:
    """How the keys of a file name the model's parameters: ours as they are, a family's official names
    (renamed through its KeyMap), or those of the model a classifier is fine-tuned from (a CRATE-MAE
    encoder: `renames` of name prefixes after the KeyMap, keys starting with `dropped` skipped)."""

    def __init__(self, name: str, keys: KeyMap | None = None, renames: Mapping[str, str] | None = None,
                 dropped: tuple[str, ...] = ()):
        self.name, self.keys, self.renames, self.dropped = name, keys, dict(renames or {}), tuple(dropped)

    @property
    def is_ours(self) -> bool:
        return self.keys is None and not self.renames

    def _source_name(self, file_key: str) -> str | None:
        return file_key if self.keys is None else self.keys.from_official(file_key)

    def is_dropped(self, file_key: str) -> bool:
        name = self._source_name(file_key)
        return bool(self.dropped) and name is not None and name.startswith(self.dropped)

    def ours(self, file_key: str) -> str | None:
        name = self._source_name(file_key)
        for src, dst in self.renames.items():
            if name is not None and name.startswith(src):
                return dst + name[len(src):]
        return name

    def file_key(self, ours: str) -> str:
        for src, dst in self.renames.items():
            if ours.startswith(dst):
                ours = src + ours[len(dst):]
                break
        return ours if self.keys is None else (self.keys.to_official(ours) or ours)


def _layouts(model: nn.Module) -> list[_Layout]:
    """The layouts a file for this model may be in: its family's official one, ours, and, for a model
    fine-tuned from another (``pretrained_from``), that model's own and official ones."""
    out = []
    if getattr(model, "official_keys", None) is not None:
        out.append(_Layout("official checkpoint", model.official_keys))
    out.append(_Layout("checkpoint"))
    source = getattr(model, "pretrained_from", None)
    if source is not None:
        kw = dict(renames=model.pretrain_renames, dropped=model.pretrain_dropped)
        out.append(_Layout(f"{source.__name__} checkpoint", None, **kw))
        if source.official_keys is not None:
            out.append(_Layout(f"official {source.__name__} checkpoint", source.official_keys, **kw))
    return out


def _layout_of(model: nn.Module, sd: Mapping[str, torch.Tensor]) -> _Layout:
    """The layout that names most of the file's keys (a file with a few extra keys of one kind still gets
    the error message of its own layout); on a tie the first of _layouts (the official one)."""
    ours = set(model.state_dict())
    return max(_layouts(model), key=lambda lay: sum(lay.is_dropped(k) or lay.ours(k) in ours for k in sd))


def _load(model: nn.Module, sd: dict[str, torch.Tensor], layout: _Layout, *, reset_head: bool | str,
          ignore: Iterable[str]) -> nn.Module:
    """Strictly load sd, named in `layout`, into model; see load_official_state_dict for the options."""
    if reset_head not in (False, True, "auto"):
        raise ValueError(f"reset_head must be False, True or 'auto', got {reset_head!r}")
    if isinstance(ignore, str):
        raise TypeError(f"ignore must be a list of key names, got the string {ignore!r}")
    if not sd:
        raise ValueError("the checkpoint holds no tensors")
    ignore = set(ignore)
    absent = sorted(ignore - set(sd))
    if absent:
        raise ValueError(f"ignore names keys the file does not have: {', '.join(absent[:20])} (names as in the "
                         "file, after a 'module.' / '_orig_mod.' prefix is removed)")
    ours = model.state_dict()
    head = tuple(getattr(model, "head_keys", ("head.",)))
    pos_keys = set(getattr(model, "resampled_pos_keys", ("pos_embed",)))
    pos_method = getattr(model, "pos_resample", "size")
    patch_keys = set(getattr(model, "resized_patch_keys", ()))
    seen, mapped, unexpected, mismatched = set(), {}, [], {}       # mismatched: our name -> message
    dropped = dict.fromkeys(k for k in sd if k not in ignore and layout.is_dropped(k))   # ordered set
    resized = []                   # what was interpolated to the model's sizes (reported: never silent)
    for k, v in sd.items():
        if k in ignore or k in dropped:
            continue
        name = layout.ours(k)
        if name is None or name not in ours:
            if reset_head and name is not None and name.startswith(head):
                continue               # a classifier the model does not have (num_classes=0): dropped
            unexpected.append(k)
            continue
        seen.add(name)
        if name in pos_keys and v.dim() == 3 and v.shape[1] != ours[name].shape[1]:
            old_grid = _square_grid(v.shape[1] - 1, k)
            v = resample_pos_embed(v, old_grid, model.config.grid_size, pos_method)
            resized.append(f"{k} from a {old_grid[0]}x{old_grid[1]} to a {'x'.join(map(str, model.config.grid_size))} "
                           "patch grid")
        if name in patch_keys and v.dim() == 4 and v.shape[:2] == ours[name].shape[:2] \
                and v.shape[2:] != ours[name].shape[2:]:
            resized.append(f"{k} from {'x'.join(map(str, v.shape[2:]))} to "
                           f"{'x'.join(map(str, ours[name].shape[2:]))} pixel patches")
            v = resize_patch_kernel(v, tuple(ours[name].shape[2:]))
        if v.shape != ours[name].shape:
            mismatched[name] = f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[name].shape)}"
            continue
        mapped[name] = v
    head_mismatch = any(n.startswith(head) for n in mismatched)
    # "auto" also keeps a fresh head when the file has none (an encoder pretrained without a classifier)
    headless = head != () and not any(n.startswith(head) for n in (*seen, *mismatched))
    kept_head = set()
    if reset_head is True or (reset_head == "auto" and (head_mismatch or headless)):
        kept_head = {n for n in ours if n.startswith(head)}        # the model's own, fresh classifier
    missing = [layout.file_key(n) for n in ours if n not in seen and n not in kept_head]
    bad_shapes = [m for n, m in mismatched.items() if n not in kept_head]
    if missing or unexpected or bad_shapes:
        lines = [f"{layout.name} does not match this {type(model).__name__} (nothing was loaded):"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", bad_shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                             + (" ..." if len(items) > 20 else ""))
        if (head_mismatch or headless) and not kept_head:
            lines.append("  (a different class count, or a file without a classifier? pass reset_head=True to keep "
                         "a new head)")
        if unexpected:
            lines.append("  (keys the model has no use for may be skipped with ignore=[...])")
        if layout.keys is not None:
            from .released import closest

            r, diff = closest(sd, type(model))
            if r is not None:
                lines.append(f"  closest known released file: {r.name} ({r.file}), which differs: "
                             f"{'; '.join(diff) or 'nothing (crate_fast.load_released builds its model)'}")
        raise RuntimeError("\n".join(lines))
    mapped = {n: v for n, v in mapped.items() if n not in kept_head}
    mapped.update({n: ours[n] for n in kept_head})
    model.load_state_dict(mapped, strict=True)
    if ignore:
        print(f"[crate_fast] skipped {len(ignore)} key(s) named in ignore: {', '.join(sorted(ignore)[:20])}",
              file=sys.stderr)
    if kept_head and reset_head == "auto":
        why = "has none" if headless else "has another class count"
        print(f"[crate_fast] kept this model's fresh classifier ({', '.join(sorted(kept_head))}): the file {why}",
              file=sys.stderr)
    if resized:
        print(f"[crate_fast] resized {'; '.join(resized)} (the file was trained at another image or patch size; "
              "build the model with the file's img_size / patch_size to use it unchanged)", file=sys.stderr)
    if dropped:
        print(f"[crate_fast] {layout.name}: skipped {len(dropped)} key(s) this {type(model).__name__} has no use "
              f"for: {', '.join(list(dropped)[:5])}{' ...' if len(dropped) > 5 else ''}", file=sys.stderr)
    return model


def load_official_state_dict(model: nn.Module, obj: Any, *, reset_head: bool | str = False,
                             ignore: Iterable[str] = (), trusted: bool = False) -> nn.Module:
    """Load weights in the official layout of the model's family into a crate_fast model, strictly.

    obj: a path (``.pt``/``.pth`` read with weights_only=True, or ``.safetensors``), a state_dict, or a
    checkpoint dict with 'state_dict' (main.py) or 'model' (demo notebooks, FAIR MAE); 'module.'
    prefixes are stripped. A position table of another square patch grid is interpolated (the family's
    ``pos_resample`` method: bicubic for CRATE, bilinear as scipy.ndimage.zoom for CRATE-alpha); a
    convolutional stem kernel of another patch size is resized bilinearly where the family allows it
    (``resized_patch_keys``: CRATE-alpha, as its fine-tuning recipe does).
    reset_head: True keeps the model's own (fresh) classifier, for another class count; "auto" does so
    only when the file's head has another shape or the file has none (a pretrained encoder). ignore: file
    keys to skip (e.g. a head the model does not have). trusted: see :func:`read_checkpoint`. A model
    fine-tuned from another family (``pretrained_from``: the CRATE-MAE classifier) also takes that
    family's files, ours or official; their keys it has no use for (the decoder) are skipped and
    reported. Returns the model.

    Raises RuntimeError listing missing, unexpected and mismatched keys (nothing is loaded then),
    ValueError for a crate_fast state_dict (use model.load_state_dict or :func:`load_weights`).
    """
    sd = unwrap_state_dict(obj, trusted=trusted)
    layout = _layout_of(model, sd)
    if layout.is_ours:
        raise ValueError("this is already a crate_fast state_dict: use model.load_state_dict(sd) "
                         "(or crate_fast.load_weights, which takes both layouts)")
    return _load(model, sd, layout, reset_head=reset_head, ignore=ignore)


def load_weights(model: nn.Module, obj: Any, *, reset_head: bool | str = False, ignore: Iterable[str] = (),
                 trusted: bool = False) -> nn.Module:
    """Load any weights for this model: a crate_fast state_dict or run checkpoint (train.py's last.pt,
    best.pt), or the official layout of its family; paths, containers, prefixes, options, strictness
    and errors as in :func:`load_official_state_dict`. The one loader behind ``train.py --finetune``
    and the analysis CLI. Returns the model."""
    sd = unwrap_state_dict(obj, trusted=trusted)
    return _load(model, sd, _layout_of(model, sd), reset_head=reset_head, ignore=ignore)


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state_dict (our names) as a .safetensors file, atomically (temporary file, then
    rename): the format any framework reads without running code. :func:`load_weights` reads it back."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_weights writes safetensors: name the file *.safetensors, got {path!r}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise FileNotFoundError(f"the folder of {path!r} does not exist")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, tmp,
                  metadata={"format": "pt", "producer": "crate_fast"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def to_official_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's parameters under its family's official names (no 'module.' prefix)."""
    keys = _key_map(model)
    out = OrderedDict()
    for k, v in model.state_dict().items():
        name = keys.to_official(k)
        if name is None:
            raise KeyError(f"parameter {k!r} has no official counterpart")
        out[name] = v
    return out
