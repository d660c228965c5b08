"""Weights into and out of a model: key layouts, strict loading, official export, the known released
files, and building the model a file needs.

- :func:`load_weights`: any weights for a crate_fast model (our own run checkpoints, state_dicts and
  model.safetensors, or the official layout of the model's family), unwrapping the usual containers and
  prefixes (crate_fast.io reads the file once).
- :func:`load_official_state_dict` / :func:`to_official_state_dict`: the official layout, both ways.
- :func:`save_weights`: our state_dict as ``.safetensors``, recording the model's config.
- :func:`identify` / :func:`load_released`: the known published files (crate_fast.RELEASED).
- :func:`load_model`: the model a file needs, built and loaded (the analysis and probe CLIs use it).

Loading is strict: a missing key, an unexpected key or a shape mismatch raises one error listing them
all, and nothing is loaded. (The official finetune.py loads with strict=False under a 'module.' prefix
mismatch and silently keeps random weights; this never does.) What a load changes on the way (a resized
position table or stem kernel, a fresh classifier, skipped keys) is reported through the
``crate_fast.checkpoint`` logger at WARNING level: never silently.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .io import CONFIG_METADATA_KEY, FAMILY_METADATA_KEY, Weights, read_weights, save_safetensors
from .layers import resample_pos_embed, resize_patch_kernel
from .models.keys import KeyMap, key_map
from .registry import FAMILIES, create_model, family_of, family_of_config, get_config, list_models
from .released import RELEASED, ReleasedFile

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------
# Layouts: how the keys of a file name the model's parameters
# ---------------------------------------------------------------------------------------------------
class _Layout:
    """Ours as they are, a family's official names (renamed through its KeyMap), or those of the model a
    classifier is fine-tuned from (a CRATE-MAE encoder: `renames` of name prefixes after the KeyMap, keys
    starting with `dropped` skipped)."""

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


# ---------------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------------
def _recorded_grid(w: Weights) -> tuple[int, int] | None:
    """The patch grid the file's model was built for, when the file records it (crate-fast's own files:
    the model config of save_weights / a run checkpoint, or a run's img_size and patch_size flags)."""
    for cfg in (w.model_config, w.run_config):
        if cfg and cfg.get("img_size") and cfg.get("patch_size"):
            size, patch = cfg["img_size"], cfg["patch_size"]
            size = (size, size) if isinstance(size, int) else tuple(size)
            patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
            return size[0] // patch[0], size[1] // patch[1]
    return None


def _source_grid(w: Weights, key: str, rows: int, pos_grid: tuple[int, int] | None) -> tuple[tuple[int, int], str]:
    """(the grid a file's position table with `rows` patch rows was trained on, how that is known).
    Raises ValueError when the file does not record it and the count is not a square."""
    grid, how = pos_grid, "as given (pos_grid)"
    if grid is None:
        grid, how = _recorded_grid(w), "recorded in the file"
    if grid is None:
        side = math.isqrt(rows)
        if side * side != rows:
            raise ValueError(f"{key} has {rows} patch positions, not a square grid, and the file does not record its "
                             "grid: pass pos_grid=(rows, columns) of the grid it was trained on")
        grid, how = (side, side), "taken as square: the file does not record it; pass pos_grid if it differs"
    if grid[0] * grid[1] != rows:
        raise ValueError(f"{key} has {rows} patch positions, which a {grid[0]}x{grid[1]} grid ({how}) does not hold")
    return tuple(grid), how


@dataclass
class _Mapped:
    """What the file's keys became on the model's side (the state of one load, before the head policy)."""

    tensors: dict = field(default_factory=dict)       # our name -> tensor, resized where needed
    seen: set = field(default_factory=set)            # our names the file has (mismatched ones included)
    unexpected: list = field(default_factory=list)    # file keys with no place in the model
    mismatched: dict = field(default_factory=dict)    # our name -> message
    dropped: list = field(default_factory=list)       # file keys the layout skips (a decoder)
    resized: list = field(default_factory=list)       # what was interpolated (reported: never silent)


def _map_keys(model: nn.Module, w: Weights, layout: _Layout, ignore: set, reset_head: bool | str,
              pos_grid: tuple[int, int] | None) -> _Mapped:
    """Rename every file key into the model's names and resize position tables (from the grid the file
    was trained on: _source_grid) and stem kernels (families listing resized_patch_keys) to the model's."""
    ours, out = model.state_dict(), _Mapped()
    head = tuple(getattr(model, "head_keys", ("head.",)))
    pos_keys = set(getattr(model, "resampled_pos_keys", ("pos_embed",)))
    patch_keys = set(getattr(model, "resized_patch_keys", ()))
    buffers = re.compile("|".join(getattr(model, "official_buffers", ())) or "(?!)")
    for k, v in w.state_dict.items():
        if k in ignore:
            continue
        if layout.is_dropped(k) or (layout.keys is not None and buffers.fullmatch(k)):
            out.dropped.append(k)
            continue
        name = layout.ours(k)
        if name is None or name not in ours:
            if not (reset_head and name is not None and name.startswith(head)):   # a head the model lacks
                out.unexpected.append(k)
            continue
        out.seen.add(name)
        if name in pos_keys and v.dim() == 3 and v.shape[2:] == ours[name].shape[2:]:
            old, how = _source_grid(w, k, v.shape[1] - 1, pos_grid)
            new = model.config.grid_size
            if old != new:
                v = resample_pos_embed(v, old, new, getattr(model, "pos_resample", "size"))
                out.resized.append(f"{k} from a {old[0]}x{old[1]} to a {new[0]}x{new[1]} patch grid "
                                   f"(the file's grid {how})")
        if name in patch_keys and v.dim() == 4 and v.shape[:2] == ours[name].shape[:2] \
                and v.shape[2:] != ours[name].shape[2:]:
            out.resized.append(f"{k} from {'x'.join(map(str, v.shape[2:]))} to "
                               f"{'x'.join(map(str, ours[name].shape[2:]))} pixel patches")
            v = resize_patch_kernel(v, tuple(ours[name].shape[2:]))
        if v.shape != ours[name].shape:
            out.mismatched[name] = f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(ours[name].shape)}"
            continue
        out.tensors[name] = v
    return out


def _kept_head(model: nn.Module, m: _Mapped, reset_head: bool | str) -> tuple[set, str | None]:
    """(the model's own classifier entries to keep fresh, why when "auto" chose it). "auto" keeps them when
    the file's head has another shape or the file has none (an encoder pretrained without a classifier)."""
    head = tuple(getattr(model, "head_keys", ("head.",)))
    if head == ():
        return set(), None
    mismatch = any(n.startswith(head) for n in m.mismatched)
    headless = not any(n.startswith(head) for n in m.seen)
    if reset_head is True or (reset_head == "auto" and (mismatch or headless)):
        why = None if reset_head is True else ("has none" if headless else "has another class count")
        return {n for n in model.state_dict() if n.startswith(head)}, why
    return set(), None


def _mismatch_error(model: nn.Module, w: Weights, layout: _Layout, m: _Mapped, missing: list,
                    bad_shapes: list) -> RuntimeError:
    """The one error of a failed load: every missing, unexpected and mismatched key, and hints."""
    lines = [f"{layout.name} does not match this {type(model).__name__} (nothing was loaded):"]
    for title, items in (("missing keys", missing), ("unexpected keys", m.unexpected),
                         ("shape mismatches", bad_shapes)):
        if items:
            lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
    head = tuple(getattr(model, "head_keys", ("head.",)))
    if head and any(n.startswith(head) for n in (*m.mismatched, *(layout.ours(k) or "" for k in missing))):
        lines.append("  (a different class count, or a file without a classifier? pass reset_head=True to keep "
                     "a new head)")
    if m.unexpected:
        lines.append("  (keys the model has no use for may be skipped with ignore=[...])")
    if layout.keys is not None:
        r, diff = closest(w.state_dict, type(model))
        if r is not None:
            lines.append(f"  closest known released file: {r.name} ({r.file}), which differs: "
                         f"{'; '.join(diff) or 'nothing (crate_fast.load_released builds its model)'}")
    return RuntimeError("\n".join(lines))


def _load(model: nn.Module, w: Weights, layout: _Layout, *, reset_head: bool | str, ignore: Iterable[str],
          pos_grid: tuple[int, int] | None = None) -> nn.Module:
    """Strictly load the weights, named in `layout`, into model; see load_official_state_dict."""
    if reset_head not in (False, True, "auto"):
        raise ValueError(f"reset_head must be False, True or 'auto', got {reset_head!r}")
    if isinstance(ignore, str):
        raise TypeError(f"ignore must be a list of key names, got the string {ignore!r}")
    if not w.state_dict:
        raise ValueError("the checkpoint holds no tensors")
    ignore = set(ignore)
    absent = sorted(ignore - set(w.state_dict))
    if absent:
        raise ValueError(f"ignore names keys the file does not have: {', '.join(absent[:20])} (names as in the "
                         "file, after a 'module.' / '_orig_mod.' prefix is removed)")
    m = _map_keys(model, w, layout, ignore, reset_head, pos_grid)
    for alias, source in getattr(model, "tied_keys", {}).items():     # one tensor under two names
        if alias not in m.seen and source in m.tensors:
            m.seen.add(alias)
            m.tensors[alias] = m.tensors[source]
    check_file = getattr(model, "check_file", None)
    if check_file is not None:
        check_file(w)
    kept, why = _kept_head(model, m, reset_head)
    ours = model.state_dict()
    missing = [layout.file_key(n) for n in ours if n not in m.seen and n not in kept]
    bad_shapes = [msg for n, msg in m.mismatched.items() if n not in kept]
    if missing or m.unexpected or bad_shapes:
        raise _mismatch_error(model, w, layout, m, missing, bad_shapes)
    model.load_state_dict({**{n: v for n, v in m.tensors.items() if n not in kept}, **{n: ours[n] for n in kept}})
    if ignore:
        logger.warning("skipped %d key(s) named in ignore: %s", len(ignore), ", ".join(sorted(ignore)[:20]))
    if why:
        logger.warning("kept this model's fresh classifier (%s): the file %s", ", ".join(sorted(kept)), why)
    if m.resized:
        logger.warning("resized %s (the file was trained at another image or patch size; build the model with the "
                       "file's img_size / patch_size to use it unchanged)", "; ".join(m.resized))
    if m.dropped:
        logger.warning("%s: skipped %d key(s) this %s has no use for: %s%s", layout.name, len(m.dropped),
                       type(model).__name__, ", ".join(m.dropped[:5]), " ..." if len(m.dropped) > 5 else "")
    return model


def load_official_state_dict(model: nn.Module, obj: Any, *, reset_head: bool | str = False,
                             ignore: Iterable[str] = (), trusted: bool = False,
                             pos_grid: tuple[int, int] | None = None) -> nn.Module:
    """Load weights in the official layout of the model's family into a crate_fast model, strictly.

    obj: a path (``.pt``/``.pth`` read with weights_only=True, or ``.safetensors``), a state_dict, or a
    checkpoint dict with 'state_dict' (main.py) or 'model' (demo notebooks, FAIR MAE); 'module.'
    prefixes are stripped. A position table of another patch grid is interpolated (the family's
    ``pos_resample`` method: bicubic for CRATE, bilinear as scipy.ndimage.zoom for CRATE-alpha) from the
    grid the file was trained on: the one crate-fast's own files record, else `pos_grid`, else a square
    grid when the table's patch count is a square (reported), else ValueError. A convolutional stem
    kernel of another patch size is resized bilinearly where the family allows it
    (``resized_patch_keys``: CRATE-alpha, as its fine-tuning recipe does).
    reset_head: True keeps the model's own (fresh) classifier, for another class count; "auto" does so
    only when the file's head has another shape or the file has none (a pretrained encoder). ignore: file
    keys to skip (e.g. a head the model does not have). trusted: see :func:`crate_fast.read_checkpoint`.
    A model fine-tuned from another family (``pretrained_from``: the CRATE-MAE classifier) also takes
    that family's files, ours or official; their keys it has no use for (the decoder) are skipped and
    reported. Returns the model.

    Raises RuntimeError listing missing, unexpected and mismatched keys (nothing is loaded then),
    ValueError for a crate_fast state_dict (use model.load_state_dict or :func:`load_weights`) or a
    position table of unknown grid.
    """
    w = read_weights(obj, trusted=trusted)
    layout = _layout_of(model, w.state_dict)
    if layout.is_ours:
        raise ValueError("this is already a crate_fast state_dict: use model.load_state_dict(sd) "
                         "(or crate_fast.load_weights, which takes both layouts)")
    return _load(model, w, layout, reset_head=reset_head, ignore=ignore, pos_grid=pos_grid)


def load_weights(model: nn.Module, obj: Any, *, reset_head: bool | str = False, ignore: Iterable[str] = (),
                 trusted: bool = False, pos_grid: tuple[int, int] | None = None) -> nn.Module:
    """Load any weights for this model: a crate_fast state_dict, model.safetensors or run checkpoint
    (train.py's last.pt, best.pt), or the official layout of its family; paths, containers, prefixes,
    options, strictness and errors as in :func:`load_official_state_dict`. The one loader behind
    ``train.py --finetune`` and the analysis CLI. Returns the model."""
    w = read_weights(obj, trusted=trusted)
    return _load(model, w, _layout_of(model, w.state_dict), reset_head=reset_head, ignore=ignore, pos_grid=pos_grid)


def to_official_state_dict(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """The model's parameters under its family's official names (no 'module.' prefix). Raises TypeError for
    a model without an official layout, KeyError for a parameter without an official name."""
    keys = key_map(model)
    out = OrderedDict()
    for k, v in model.state_dict().items():
        name = keys.to_official(k)
        if name is None:
            raise KeyError(f"parameter {k!r} has no official counterpart")
        out[name] = v
    return out


def model_record(model: nn.Module) -> dict:
    """What crate-fast's own files record about their model: {"family": its family's name, "model_config":
    its config as a dict} (run checkpoints hold both entries; model.safetensors' metadata the same)."""
    return {"family": family_of_config(model.config).name, "model_config": model.config.to_dict()}


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the model's state_dict (our names) as a .safetensors file, atomically (temporary file, then
    rename), recording the model's family and config in the file's metadata (so a load knows the patch
    grid it was trained on, and :func:`load_model` rebuilds the model): the format any framework reads
    without running code. :func:`load_weights` reads it back. Raises ValueError for another suffix,
    FileNotFoundError for a missing folder."""
    record, tied = model_record(model), getattr(model, "tied_keys", {})
    # a tensor shared by two names is stored once (safetensors refuses shared memory); load_weights ties it
    tensors = {k: v for k, v in model.state_dict().items() if k not in tied}
    save_safetensors(tensors, path, metadata={FAMILY_METADATA_KEY: record["family"],
                                              CONFIG_METADATA_KEY: json.dumps(record["model_config"])})


# ---------------------------------------------------------------------------------------------------
# The known released files (crate_fast.RELEASED)
# ---------------------------------------------------------------------------------------------------
@functools.cache
def _layout_shapes(name: str) -> tuple[type, dict[str, tuple]]:
    """(model class, {official key: shape}) of a released file's model, built once on the meta device
    (shapes only: no memory, no initialization cost)."""
    with torch.device("meta"):
        model = create_model(name)
    shapes = {k: tuple(v.shape) for k, v in to_official_state_dict(model).items()}
    return type(model), {**shapes, **RELEASED[name].ignore}


def closest(sd: Mapping[str, torch.Tensor], model_class: type | None = None) -> tuple[ReleasedFile | None, list[str]]:
    """The known file (of model_class's family, if given) whose layout shares most (key, shape) pairs
    with sd, and what differs from it; (None, []) when there is none."""
    got = {k: tuple(v.shape) for k, v in sd.items()}
    best, best_score, best_diff = None, (-1, -1), []
    for r in RELEASED.values():
        cls, want = _layout_shapes(r.name)
        if model_class is not None and cls is not model_class:
            continue
        # key names first (they tell the family), then shapes (they tell the size)
        score = (sum(k in got for k in want), sum(got.get(k) == s for k, s in want.items()))
        if score > best_score:
            missing = [k for k in want if k not in got]
            extra = [k for k in got if k not in want]
            shapes = [f"{k}: {got[k]} vs {s}" for k, s in want.items() if k in got and got[k] != s]
            diff = ([f"missing {len(missing)}: {', '.join(missing[:5])}"] if missing else []) + \
                   ([f"extra {len(extra)}: {', '.join(extra[:5])}"] if extra else []) + \
                   ([f"shapes {len(shapes)}: {'; '.join(shapes[:5])}"] if shapes else [])
            best, best_score, best_diff = r, score, diff
    return best, best_diff


def identify(obj: Any, *, trusted: bool = False) -> ReleasedFile:
    """Which known released file `obj` (a path, a checkpoint dict or a state_dict) is. Raises ValueError
    naming the closest known layout and what differs when it is none of them."""
    sd = read_weights(obj, trusted=trusted).state_dict
    got = {k: tuple(v.shape) for k, v in sd.items()}
    for r in RELEASED.values():
        if got == _layout_shapes(r.name)[1]:
            return r
    r, diff = closest(sd)
    raise ValueError(f"not a known released file; closest: {r.name} ({r.file}), which differs: {'; '.join(diff)}. "
                     "For other weights (a train.py run, another size) build the model with crate_fast.create_model "
                     "and load them with crate_fast.load_weights.")


def load_released(obj: Any, *, trusted: bool = False, impl: str = "auto") -> nn.Module:
    """Build the model a known released file needs and load it strictly (its unused keys skipped).
    obj: a path or an already-read checkpoint (read once). Raises ValueError for an unknown file (see
    :func:`identify`)."""
    w = read_weights(obj, trusted=trusted)
    r = identify(w)
    model = create_model(r.name, impl=impl)
    return _load(model, w, _layout_of(model, w.state_dict), reset_head=False, ignore=list(r.ignore))


# ---------------------------------------------------------------------------------------------------
# The model a file needs
# ---------------------------------------------------------------------------------------------------
# Model options a train.py run records among its flags (its run config) that change what an evaluation
# computes, and the same read from a FAIR-style checkpoint's training arguments (the released CRATE-MAE
# file's 'args'); each is passed when the family's config has it.
_RUN_MODEL_FIELDS = ("pool", "mask_ratio", "norm_pix_loss")
_FAIR_ARGS_FIELDS = ("mask_ratio", "norm_pix_loss")


def _config_of(w: Weights, arch: str | None, img_size: int | None, patch_size: int | None, impl: str):
    """The config of the model that made the file: recorded exactly by crate-fast's own files, else the
    arch's preset (a run's own --arch by default) with the sizes (a run's recorded ones, else the
    arguments) and the model options a run's flags or FAIR's training arguments record, and a
    classifier's class count from its head."""
    if arch is None and w.model_config is not None and w.family is not None:
        if w.family not in FAMILIES:
            raise ValueError(f"{w.source!r} records a model family {w.family!r} this crate-fast does not know")
        return FAMILIES[w.family].config_class.from_dict({**w.model_config, "impl": impl})
    sizes = {k: v for k, v in (("img_size", img_size), ("patch_size", patch_size)) if v is not None}
    for fam in ([family_of(arch)] if arch else FAMILIES.values()):
        cfg = fam.config_from_file(w, impl) if fam.config_from_file is not None else None
        if cfg is not None:                     # a file in the family's own format that names its model
            return cfg
    recorded = {}
    if w.run_config is not None:
        arch = arch or w.run_config["arch"]
        recorded = {k: w.run_config.get(k) for k in _RUN_MODEL_FIELDS}
        sizes = {"img_size": w.run_config["img_size"], "patch_size": w.run_config["patch_size"]}
    elif w.args is not None:
        recorded = {k: getattr(w.args, k, None) for k in _FAIR_ARGS_FIELDS}
    if arch is None:
        raise ValueError(f"{w.source!r} is not a crate-fast run checkpoint or model file: name its model (arch; the "
                         f"CLIs' --arch: one of {', '.join(list_models())}) and, if not the preset's, its sizes "
                         "(img_size / patch_size; --img-size / --patch-size)")
    fields = family_of(arch).config_class.__dataclass_fields__
    overrides = {k: v for k, v in recorded.items() if k in fields and v is not None}
    if "num_classes" in fields:
        head = w.state_dict.get("head.weight", w.state_dict.get("mlp_head.1.weight"))
        if head is None:
            raise ValueError(f"{w.source!r} has no classifier weights (head.weight or mlp_head.1.weight)")
        overrides["num_classes"] = head.shape[0]
    return get_config(arch, **sizes, **overrides, impl=impl)


def load_model(obj: Any, arch: str | None = None, img_size: int | None = None, patch_size: int | None = None, *,
               impl: str = "auto", trusted: bool = False) -> nn.Module:
    """Build the model a weight file needs and load it strictly (the file is read once).

    obj: a path or an object :func:`crate_fast.io.read_weights` takes. crate-fast's own files record
    their model (save_weights' model.safetensors, train.py's last.pt / best.pt: their sizes are used,
    whatever img_size / patch_size say); other weights (an official file of a family, a bare state_dict)
    need `arch` (any create_model name) and, if not the preset's, img_size / patch_size. Classifiers
    take their class count from the file's head; CRATE-MAE takes mask_ratio and norm_pix_loss from a
    run's flags or a FAIR checkpoint's ``args``.
    Raises FileNotFoundError, ValueError (no arch for a file that does not record its model, an unknown
    arch, a classifier file without a head), RuntimeError (weights that do not fit: :func:`load_weights`).
    """
    w = read_weights(obj, trusted=trusted)
    model = family_of_config(cfg := _config_of(w, arch, img_size, patch_size, impl)).model_class(cfg)
    return _load(model, w, _layout_of(model, w.state_dict), reset_head=False, ignore=())
