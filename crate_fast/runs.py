"""Run directories: atomic checkpoint files, RNG state, and finding the checkpoint to resume from.

A run checkpoint (train.py's last.pt / best.pt) is a dict of tensors and plain containers only
(model and optimizer state_dicts, scaler state, counters, RNG states as tensors, the run's config as
a dict), so it loads with ``torch.load(weights_only=True)`` like any file from elsewhere: resuming
never runs code from a file. Its weights also load through :func:`crate_fast.load_weights`.
"""
from __future__ import annotations

import os
import random
from typing import Any

import numpy as np
import torch

from .checkpoint import read_checkpoint

RUN_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "rng", "config")


def save_atomic(obj: Any, path: str) -> None:
    """torch.save to a temporary file, fsync, rename: the previous file stays valid until the new one
    is whole (a killed process never leaves a half-written checkpoint)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state() -> dict:
    """Every RNG a training step draws from (torch CPU and CUDA, numpy's global, Python's), as tensors and
    plain containers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002  (the global state, whoever uses it)
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],  # noqa: NPY002
                         n["cached_gaussian"]))
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def find_resume(resume: str | None, out: str) -> str | None:
    """The checkpoint to resume from: ``resume`` is None (fresh run), "auto" (OUT/last.pt if it exists,
    else a fresh run), a run directory (its last.pt) or a file. Raises FileNotFoundError when an explicit
    directory or file has no checkpoint."""
    if resume is None:
        return None
    path = out if resume == "auto" else resume
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.exists(path):
        if resume == "auto":
            return None
        raise FileNotFoundError(f"--resume {resume!r}: no checkpoint at {path}")
    return path


def load_run_checkpoint(path: str, *, trusted: bool = False) -> dict:
    """A run checkpoint written by train.py (see the module docstring). Raises ValueError when the
    file is not one (a bare state_dict or an official checkpoint: use --finetune for those),
    UnsafeCheckpointError when it needs code execution to load (see crate_fast.read_checkpoint)."""
    ckpt = read_checkpoint(path, trusted=trusted)
    missing = [k for k in RUN_KEYS if not (isinstance(ckpt, dict) and k in ckpt)]
    if missing:
        raise ValueError(f"{path!r} is not a crate_fast run checkpoint (no {', '.join(missing)}); "
                         "to start from its weights use --finetune")
    return ckpt
