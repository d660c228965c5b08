"""Preparing data once: conversions into the cache and downloads, under torch.distributed and across nodes.

Two layers, both used by sources.build_loaders:

- :func:`prepare_once` (ranks of a job): when torch.distributed is initialized, local rank 0 of each
  node (env LOCAL_RANK, else 0) runs the preparation while the node's other ranks wait, then they run
  it too and find everything in place (they only open the files). Without it, every rank converted
  (or downloaded) the same data at once: N full conversions, each with its own workers and temporary
  file, and N downloads racing into one folder.
- :func:`cache_lock` (processes sharing a directory): an exclusive lock file around one conversion, so
  that the local ranks 0 of nodes that share one cache directory (or two jobs) do not duplicate it.
  The caller checks again whether the result exists once it holds the lock. flock works across
  machines on NFS (v4, and v3 with Linux's lock manager); on a file system without it, see cache_lock.

Outside torch.distributed, prepare_once just calls the preparation: a single process behaves as before.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
T = TypeVar("T")

# How long the other ranks wait for local rank 0's preparation. The wait runs on a gloo group of its own
# with this timeout: the default group's timeout (10 min for NCCL) is shorter than an ImageNet
# conversion, and the waiting ranks would be stopped with a timeout error halfway through it.
PREPARE_TIMEOUT = timedelta(hours=24)


def local_rank() -> int:
    """This process's rank on its node: env LOCAL_RANK (set by torchrun), else 0."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def _acquire(path: str) -> int | None:
    """A descriptor of the lock file at `path`, locked exclusively; None where it cannot be had."""
    while True:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            log.debug("cannot open the lock file %s (%s); going on without it", path, e)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            os.close(fd)
            log.warning("cannot lock %s (%s): processes sharing this directory may prepare the same data at "
                        "once (correct, but duplicate work)", path, e)
            return None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)                  # the previous holder removed this file while we waited: lock anew


@contextlib.contextmanager
def cache_lock(directory: str, name: str):
    """Hold an exclusive lock (fcntl.flock) on `directory`/.`name`.lock while the block runs; other
    processes that ask for the same lock wait. The holder removes the lock file when it is done, so
    nothing is left in the directory; a waiter that then holds the lock of a removed file sees that
    (the path no longer names its file) and locks the path anew, so two processes never both hold it.

    Where the lock cannot be had (a read-only directory, a file system without flock), the block runs
    without it: the writes are atomic anyway, the lock only avoids duplicate work. That is said at
    warning level when the file system refuses the lock, at debug level for a read-only directory
    (which then needs no writing: it holds data prepared before)."""
    path = os.path.join(directory, f".{name}.lock")
    fd = _acquire(path)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(path)       # while still locked: see the docstring
            os.close(fd)              # releases the lock


def prepare_once(prepare: Callable[[], T]) -> T:
    """prepare(), run on each node's local rank 0 before the node's other ranks run it (see the module
    docstring); every rank returns its own call's result. All ranks of the default group must call this
    together (it waits on a collective). Outside torch.distributed (or with one rank) it is prepare().

    Raises what prepare() raises on local rank 0; the ranks that waited then raise RuntimeError
    instead of preparing again."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return prepare()
    first, result, error = local_rank() == 0, None, None
    group = dist.new_group(backend="gloo", timeout=PREPARE_TIMEOUT)
    try:
        if first:
            try:
                result = prepare()
            except BaseException as e:  # noqa: BLE001 - reported to the waiting ranks, then raised here
                error = e
        # The barrier: every rank waits here until each node's local rank 0 is done; the sum says
        # whether any of them failed, so that the others stop instead of preparing it themselves.
        failed = torch.tensor([int(error is not None)], dtype=torch.int64)
        dist.all_reduce(failed, group=group)
    finally:
        dist.destroy_process_group(group)
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError(f"preparing the data failed on the local rank 0 of {failed.item()} node(s); "
                           "its log says why")
    return result if first else prepare()
