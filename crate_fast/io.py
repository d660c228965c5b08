"""Files at the bottom of the house: safe reading, unwrapping, and one atomic writer.

- :func:`read_checkpoint`: a ``.pt`` / ``.pth`` file through ``torch.load(weights_only=True)`` (tensors and
  plain containers only: nothing in the file runs) or a ``.safetensors`` file. A pickle that needs more
  is refused with an error naming the file and the opt-in for a file the user trusts.
- :func:`read_weights`: any of those (or an object already read) as one :class:`Weights`: the flat
  state_dict, unwrapped from the usual containers and prefixes, plus what the file records about the
  model that made it (crate-fast's model config, a train.py run's config, FAIR's training arguments).
  Every loader reads a file once, through this.
- :func:`atomic_write`: a temporary file in the target's folder, fsync, rename; the previous file stays
  whole until the new one is. :func:`save_atomic` (torch.save) and :func:`save_safetensors` use it.

Nothing here imports the rest of crate_fast.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, Any

import torch

_WRAPPERS = ("state_dict", "model")            # main.py / train.py and FAIR MAE / the demo notebooks / nanoGPT
_STRIP_PREFIXES = ("module.", "_orig_mod.")    # DataParallel/DDP, torch.compile
# The safetensors metadata keys under which crate_fast.save_weights records the model's family and config
# (JSON); run checkpoints hold the same as their "family" and "model_config" entries.
FAMILY_METADATA_KEY = "crate_fast.family"
CONFIG_METADATA_KEY = "crate_fast.config"


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded without running code from the file."""


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise IsADirectoryError(f"checkpoint {path!r} is a directory; pass a file in it (a run's best.pt, "
                                "last.pt or model.safetensors)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path!r} is not a readable .safetensors file ({e})") from e


def read_checkpoint(path: str | os.PathLike, *, trusted: bool = False) -> Any:
    """The object stored in a checkpoint file, loaded onto the CPU.

    ``.safetensors``: a dict of tensors (the safetensors library). Anything else: ``torch.load`` with
    ``weights_only=True``, which restores tensors and plain Python containers and refuses any other
    object, so a file someone hands you cannot run code. ``trusted=True`` lifts that restriction for a
    file you made or trust (``torch.load(weights_only=False)``: the pickle may execute arbitrary code).

    Raises FileNotFoundError / IsADirectoryError, UnsafeCheckpointError (the file needs ``trusted=True``)
    or ValueError (not a checkpoint at all).
    """
    path = os.fspath(path)
    _check_file(path)
    if path.endswith(".safetensors"):
        return _read_safetensors(path)[0]
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


@dataclass
class Weights:
    """A weight file (or object) read once: the flat state_dict and what the file says about its model.

    state_dict: {name: tensor} with the 'module.' / '_orig_mod.' prefixes stripped.
    family, model_config: the model family's name and config crate-fast recorded (save_weights' safetensors
        metadata, a train.py run checkpoint's ``family`` and ``model_config``), the config as a dict; None
        for other files.
    run_config: a train.py run checkpoint's flags (its ``config``, which names the ``arch``), else None.
    args: a FAIR-style checkpoint's training arguments (``args``, an argparse.Namespace), else None.
    extra: the container's other entries (e.g. nanoGPT's ``model_args``), else {}.
    source: the path, or "a state_dict" for an object handed in.
    """

    state_dict: dict[str, torch.Tensor]
    family: str | None = None
    model_config: dict | None = None
    run_config: dict | None = None
    args: argparse.Namespace | None = None
    extra: dict | None = None
    source: str = "a state_dict"


def _flat(obj: Mapping) -> dict[str, torch.Tensor]:
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


def read_weights(obj: Any, *, trusted: bool = False) -> Weights:
    """Read `obj` once: a path (see :func:`read_checkpoint`), a :class:`Weights` (returned as is), a
    state_dict, or a checkpoint dict holding one under 'state_dict' or 'model'.

    Raises what read_checkpoint raises for a path, TypeError when obj is none of these (an entry that is
    not a tensor, say)."""
    if isinstance(obj, Weights):
        return obj
    source, meta = "a state_dict", {}
    if isinstance(obj, (str, os.PathLike)):
        source = os.fspath(obj)
        _check_file(source)
        if source.endswith(".safetensors"):
            obj, meta = _read_safetensors(source)
        else:
            obj = read_checkpoint(source, trusted=trusted)
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state_dict or checkpoint dict, got {type(obj).__name__}")
    wrapper = next((w for w in _WRAPPERS if isinstance(obj.get(w), Mapping)), None)
    sd = _flat(obj[wrapper] if wrapper else obj)
    family = meta.get(FAMILY_METADATA_KEY)
    model_config = json.loads(meta[CONFIG_METADATA_KEY]) if CONFIG_METADATA_KEY in meta else None
    extra = {k: v for k, v in obj.items() if k != wrapper} if wrapper else {}
    if isinstance(extra.get("model_config"), Mapping) and isinstance(extra.get("family"), str):
        family, model_config = extra["family"], dict(extra["model_config"])
    # a train.py run's flags (nanoGPT files also hold a "config": their own, without an arch)
    run_config = extra["config"] if isinstance(extra.get("config"), Mapping) and "arch" in extra["config"] else None
    args = extra.get("args") if isinstance(extra.get("args"), argparse.Namespace) else None
    return Weights(sd, family, model_config, run_config, args, extra, source)


def unwrap_state_dict(obj: Any, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} from a path, a state_dict, or a checkpoint dict holding 'state_dict' or
    'model' (:func:`read_weights`' state_dict). Raises like read_weights."""
    return read_weights(obj, trusted=trusted).state_dict


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """Call write(f) on a temporary file beside `path`, fsync, then rename it to `path`: the previous
    file stays whole until the new one is (a killed process never leaves a half-written file), and no
    temporary file is left behind on any error. Raises FileNotFoundError when the folder is missing."""
    path = os.fspath(path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise FileNotFoundError(f"the folder of {path!r} does not exist")
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save(obj) to `path` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors as a .safetensors file through :func:`atomic_write` (made contiguous, detached).
    metadata: extra str -> str entries beside {"format": "pt", "producer": "crate_fast"}.
    Raises ValueError when path does not end in .safetensors."""
    from safetensors.torch import save

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_weights writes safetensors: name the file *.safetensors, got {path!r}")
    meta = {"format": "pt", "producer": "crate_fast", **(metadata or {})}
    data = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=meta)
    atomic_write(path, lambda f: f.write(data))
