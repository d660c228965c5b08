"""The known released weight files of the CRATE family: what each one is, the model it needs, and how
to load it.

    model = crate_fast.load_released("crate-demo.pth")            # identifies the file, builds, loads
    model = crate_fast.create_model("crate_base_demo")            # the model a known file needs

No file is downloaded here (nothing in crate-fast fetches weights); :data:`RELEASED` says where each
one was published. Files are read safely (crate_fast.read_checkpoint): FAIR-style checkpoints keep
their training arguments as an ``argparse.Namespace``, which the reader allows explicitly.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoint import load_official_state_dict, to_official_state_dict, unwrap_state_dict


@dataclass(frozen=True)
class ReleasedFile:
    """One published weight file. ``name`` is also a :func:`crate_fast.create_model` name that builds the
    model the file needs (``arch`` with ``overrides``); ``ignore`` lists file keys the model has no use
    for (skipped, and reported, when loading)."""

    name: str
    file: str
    arch: str
    overrides: dict
    container: str                     # how the state_dict sits in the file
    where: str                         # where it was published (download by hand)
    note: str = ""
    ignore: dict = field(default_factory=dict)    # file key -> shape, present in the file, unused


RELEASED: dict[str, ReleasedFile] = {r.name: r for r in [
    ReleasedFile(
        "crate_small_in1k", "CRATE_small.pth (released CRATE-S)", "crate_small", {},
        "main.py checkpoint: {'state_dict': {'module.' + key: ...}, 'epoch', 'arch', 'optimizer', ...}",
        "Google Drive link in the official README (Ma-Lab-Berkeley/CRATE); the link is dead since 2025 "
        "(official issue #30)",
        "ImageNet-1K, 224 px, patch 16; the maintainers say it differs from the paper's model (issue #28)."),
    ReleasedFile(
        "crate_base_demo", "crate-demo.pth (the official Colab demo)", "crate_base",
        dict(patch_size=8, heads=6, num_classes=768),
        "{'model': state_dict}, no prefix",
        "the checkpoint the official Colab demo notebook downloads (linked from the official README)",
        "CRATE-B at patch 8 with 6 heads of 128 (ImageNet-21K); its classifier is LayerNorm + Linear(768, 768) "
        "and the file carries an extra 21,842-class `head` the notebook never uses.",
        ignore={"head.weight": (21842, 768), "head.bias": (21842,)}),
    ReleasedFile(
        "crate_mae_base_in1k", "crate-mae-base-lmd0.5-checkpoint-799.pth (CRATE-MAE-Base)", "mae_crate_base", {},
        "FAIR MAE save_model: {'model': state_dict (206 keys, no prefix), 'optimizer', 'epoch': 799, 'scaler', "
        "'args': Namespace}",
        "Google Drive link in the official README (Ma-Lab-Berkeley/CRATE, \"Training/Fine-Tuning CRATE-MAE\")",
        "800 epochs of ImageNet-1K pretraining with lambda = 0.5 (the file's name and the official code agree); "
        "whether norm_pix_loss was on is recorded only in the file's args (it changes the loss, not the weights)."),
    ReleasedFile(
        "crate_alpha_base_in1k", "crate_alpha_B16.pth (CRATE-alpha-B/16)", "crate_alpha_base", {},
        "a raw state_dict of the official PyTorch port (conv1.*, transformer.layers.*, mlp_head.*)",
        "huggingface.co/UCSC-VLAA/CRATE-alpha, torch/ (linked from the official README)",
        "IN-21K pretrained, IN-1K finetuned, 224 px; 81.2% IN-1K top-1 (official README)."),
    ReleasedFile(
        "crate_alpha_large_in1k", "crate_alpha_L14.pth (CRATE-alpha-L/14)", "crate_alpha_large", {},
        "a raw state_dict of the official PyTorch port (conv1.*, transformer.layers.*, mlp_head.*)",
        "huggingface.co/UCSC-VLAA/CRATE-alpha, torch/ (linked from the official README)",
        "IN-21K pretrained, IN-1K finetuned, 224 px; 83.9% IN-1K top-1 (official README)."),
]}


def released_config_overrides(name: str) -> tuple[str, dict] | None:
    """(preset, overrides) for a released file's model name, or None."""
    r = RELEASED.get(name)
    return (r.arch, r.overrides) if r else None


@functools.cache
def _layout(name: str) -> tuple[type, dict[str, tuple]]:
    """(model class, {official key: shape}) of a released file's model, built once on the meta device
    (shapes only: no memory, no initialisation cost)."""
    from .registry import create_model

    with torch.device("meta"):
        model = create_model(name)
    shapes = {k: tuple(v.shape) for k, v in to_official_state_dict(model).items()}
    return type(model), {**shapes, **RELEASED[name].ignore}


def expected_shapes(r: ReleasedFile) -> dict[str, tuple]:
    """Every key of the file's state_dict (official names) and its shape."""
    return _layout(r.name)[1]


def closest(sd: dict[str, torch.Tensor], model_class: type | None = None) -> tuple[ReleasedFile | None, list[str]]:
    """The known file (of model_class's family, if given) whose layout shares most (key, shape) pairs
    with sd, and what differs from it; (None, []) when there is none."""
    got = {k: tuple(v.shape) for k, v in sd.items()}
    best, best_score, best_diff = None, (-1, -1), []
    for r in RELEASED.values():
        if model_class is not None and _layout(r.name)[0] is not model_class:
            continue
        want = expected_shapes(r)
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


def identify(obj, *, trusted: bool = False) -> ReleasedFile:
    """Which known released file `obj` (a path, a checkpoint dict or a state_dict) is. Raises ValueError
    naming the closest known layout and what differs when it is none of them."""
    sd = unwrap_state_dict(obj, trusted=trusted)
    got = {k: tuple(v.shape) for k, v in sd.items()}
    for r in RELEASED.values():
        if got == expected_shapes(r):
            return r
    r, diff = closest(sd)
    raise ValueError(f"not a known released file; closest: {r.name} ({r.file}), which differs: {'; '.join(diff)}. "
                     "For other weights (a train.py run, another size) build the model with crate_fast.create_model "
                     "and load them with crate_fast.load_weights.")


def load_released(obj, *, trusted: bool = False, impl: str = "auto") -> nn.Module:
    """Build the model a known released file needs and load it strictly (its unused keys skipped).
    obj: a path or an already-read checkpoint. Raises ValueError for an unknown file (see identify)."""
    from .registry import create_model

    sd = unwrap_state_dict(obj, trusted=trusted)
    r = identify(sd)
    model = create_model(r.name, impl=impl)
    return load_official_state_dict(model, sd, ignore=list(r.ignore))
