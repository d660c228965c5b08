"""Run checkpoints: the schema train.py writes (last.pt, best.pt), reads and checks on resume, in one file.

A run checkpoint is a dict of tensors and plain containers only, so it loads with
``torch.load(weights_only=True)`` like any file from elsewhere: resuming never runs code from a file. Its
weights also load through :func:`crate_fast.load_weights` (it records its model's family and config):

    model, optimizer, scaler      state_dicts
    epoch, step, best_score, nonfinite_steps
    rng                           every rank's RNG states, a list indexed by rank
    config                        the run's flags (TrainConfig as a dict)
    family, model_config          the model's family name and config (crate_fast.checkpoint.model_record)

Multi-node runs (docs/DESIGN.md §8): the resume is decided once, by rank 0, after the process group exists,
and every rank loads that one file; the ranks then check that they hold the same step and weights, or stop
at once naming the ranks and hosts that differ. --out must be on a file system every node shares
(check_shared_out tests it at the start of every multi-process run).
"""
from __future__ import annotations

import logging
import os
import random
import secrets
import time

import numpy as np
import torch
from torch import nn

from crate_fast.checkpoint import model_record
from crate_fast.io import UnsafeCheckpointError, read_checkpoint

from . import dist

logger = logging.getLogger(__name__)
RUN_KEYS = ("model", "optimizer", "scaler", "epoch", "step", "rng", "config")
_MARKER = ".crate_fast_run"


# ---------------------------------------------------------------------------------------------------
# Random numbers
# ---------------------------------------------------------------------------------------------------
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


def seed_training_draws(*entropy: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and Python's global generators from `entropy` (e.g. the run's
    seed and this rank): the draws of training (masks, dropout, drop-path, RandAugment, mixup) then
    differ between ranks, as FAIR's MAE seeds seed + rank, and repeat for the same seed. numpy's
    SeedSequence mixes the numbers, so no rank's stream is another's shifted."""
    seeds = np.random.SeedSequence(list(entropy)).generate_state(3)
    torch.manual_seed(int(seeds[0]))
    np.random.seed(int(seeds[1]))  # noqa: NPY002  (timm's Mixup draws from numpy's global generator)
    random.seed(int(seeds[2]))


class NonfiniteGuard:
    """The NaN guard: a step is taken only when every micro-batch loss of it was finite on every rank; a
    streak of max_in_row skipped steps stops the run before any NaN reaches a checkpoint. total counts
    the skipped steps of the run (kept in its checkpoints)."""

    def __init__(self, max_in_row: int):
        self.max_in_row, self.in_row, self.total = max_in_row, 0, 0

    def all_finite(self, finite: torch.Tensor, step: int) -> bool:
        """finite: this rank's 0-dim flag (1: every loss of the step finite), reduced over the ranks here;
        its one host read per step. Returns whether the step may be taken. Raises FloatingPointError after
        max_in_row skipped steps in a row."""
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if finite.item() != 0:
            self.in_row = 0
            return True
        self.in_row += 1
        self.total += 1
        if self.in_row >= self.max_in_row:
            raise FloatingPointError(f"{self.in_row} non-finite losses in a row at step {step}; stopping (lower "
                                     "--lr, or use --precision bf16 / --grad-clip)")
        return False


# ---------------------------------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------------------------------
def run_state(model: nn.Module, optimizer, scaler, counters: dict, config: dict) -> dict:
    """The checkpoint of a run at this point (module docstring). counters: epoch, step, best_score,
    nonfinite_steps. Collective: every rank calls it (their RNG states are gathered); rank 0 writes it."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            **counters, "rng": dist.all_gather_object(rng_state()), "config": config, **model_record(model)}


def exit_on_bad_file(flag: str, path: str, load):
    """load(), with a bad --resume / --finetune file turned into one error line naming the flag (SystemExit)."""
    try:
        return load()
    except (FileNotFoundError, ValueError, TypeError, RuntimeError, UnsafeCheckpointError) as e:
        hint = " (or pass --trust-checkpoint)" if isinstance(e, UnsafeCheckpointError) and \
            "--trust-checkpoint" not in str(e) else ""
        raise SystemExit(f"error: {flag} {path}: {e}{hint}") from e


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


def check_resumable(saved: dict, config: dict, flags: list[str], path: str) -> None:
    """SystemExit unless the checkpoint's run (its flags `saved`) and this one (`config`) agree on every
    flag in `flags`: the model's and the optimizer state's (a resumed run continues the same training;
    --finetune starts a new one from its weights)."""
    differ = [f"--{k.replace('_', '-')} {saved[k]!r} there, {config[k]!r} now"
              for k in flags if k in saved and _same(saved[k]) != _same(config[k])]
    if differ:
        raise SystemExit(f"error: --resume {path}: this run's settings differ from the checkpoint's "
                         f"({'; '.join(differ)}). Resume with the run's own flags (its config.json has them), "
                         "or start a new --out with --finetune to begin from its weights.")


def _same(value):
    """A config value as compared across runs (a JSON round trip turns tuples into lists)."""
    return list(value) if isinstance(value, tuple) else value


def restore(ckpt: dict, model: nn.Module, optimizer, scaler, ranks: dist.Ranks, seed: int) -> tuple:
    """Load a run checkpoint's model, optimizer and scaler states and this rank's RNG states (restore_rng).
    Returns its (epoch, step, best_score, nonfinite_steps)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt, ranks.rank, ranks.world, seed)
    return ckpt["epoch"], ckpt["step"], ckpt["best_score"], ckpt.get("nonfinite_steps", 0)


def restore_rng(ckpt: dict, rank: int, world: int, seed: int) -> None:
    """Each rank takes its own RNG states back; at another world size the ranks are reseeded from (seed,
    rank, step) instead, deterministically, and the run says so."""
    states = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]
    if len(states) == world:
        set_rng_state(states[rank])
        return
    seed_training_draws(seed, rank, ckpt["step"])
    if rank == 0:
        logger.warning("the checkpoint holds the RNG states of %d rank(s), this run has %d: every rank's random "
                       "draws (masks, dropout, mixup, augmentation) were reseeded from (seed, rank, step %d), so "
                       "the run continues deterministically but not as an uninterrupted run would",
                       len(states), world, ckpt["step"])


# ---------------------------------------------------------------------------------------------------
# Deciding and checking a resume across ranks and nodes
# ---------------------------------------------------------------------------------------------------
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


def check_shared_out(out: str, timeout: float = 10.0) -> None:
    """With several processes: stop every rank at once unless all of them see --out as one directory.
    Rank 0 writes a marker with a fresh token; each rank waits up to `timeout` s to read it (a network
    file system may show a new file late). Raises SystemExit naming the ranks and hosts that do not."""
    token = dist.broadcast_object(secrets.token_hex(8) if _is_main() else None)
    if _is_main():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, _MARKER), "w") as f:
            f.write(token)
    dist.barrier()
    deadline, seen = time.monotonic() + timeout, False
    while not seen:
        try:
            with open(os.path.join(out, _MARKER)) as f:
                seen = f.read() == token
        except OSError:
            pass
        if seen or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    try:
        dist.check_agree(f"--out {out!r} being one directory (rank 0 wrote {_MARKER} there)", seen)
    except SystemExit as e:
        raise SystemExit(f"{e}. --out must be on a file system every node shares (checkpoints are written by "
                         "rank 0, which may be on any node after a restart, and every rank resumes from them)") from e


def decide_resume(resume: str | None, out: str) -> str | None:
    """find_resume on rank 0 only, its answer (or its error) sent to every rank, which must then see the
    same file. Raises SystemExit on every rank for a missing explicit checkpoint, or one some rank cannot
    read (naming them)."""
    answer = None
    if _is_main():
        try:
            answer = ("path", find_resume(resume, out))
        except FileNotFoundError as e:
            answer = ("error", str(e))
    kind, value = dist.broadcast_object(answer)
    if kind == "error":
        raise SystemExit(f"error: {value}")
    if value is not None:
        dist.check_agree(f"seeing the checkpoint {value!r} to resume from", os.path.isfile(value))
    return value


def check_same_state(model: nn.Module, counters: dict) -> None:
    """After a resume: stop every rank unless all hold the same (epoch, step) and the same weights
    (a float64 checksum of every tensor of the state_dict)."""
    with torch.no_grad():
        checksum = sum(float(t.double().sum()) + float(t.double().square().sum())
                       for t in model.state_dict().values() if t.is_floating_point())
    dist.check_agree("the resumed state (epoch, step, weights checksum)",
                     (counters["epoch"], counters["step"], round(checksum, 6)))


def _is_main() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0

