"""Write .beton files: an indexed data set (write_beton) or an ImageFolder tree (write_image_folder).

Every image of a folder is decoded once before writing (datasets.load_rgb: upright as shown, 16-bit
and other modes mapped to 8-bit RGB by their real range). Files that cannot be stored are skipped,
counted and listed (folders.scan_image_folder), never a crash halfway: unreadable or corrupt files,
images without a faithful RGB form, and images too thin for FFCV (a side below MIN_STORED_SIDE px once
FFCV has scaled the longest side down to max_resolution: a 0-px side crashes FFCV's writer, a 1-px
side its center crop).

The result is atomic, and the write always ends. It runs in a watched child process: a failing
sample, a writer process that errors or dies, one that makes no progress for `stall_timeout` seconds,
Ctrl-C or SIGTERM stops all of its processes with a clear error, and neither OUT nor any temporary
file (nor FFCV's shared memory) is left behind; a parent killed outright (SIGKILL) takes the writer's
processes with it, leaving only its hidden .OUT.writing-* folder. The .beton is written under a
temporary name and renamed only when complete. Defaults follow FFCV's ImageNet recipe (max side 256,
JPEG quality 90, half the images JPEG).

Class names given to the writer (an ImageFolder's sorted class folders; label i is the i-th) are
recorded next to OUT, in OUT + '.classes.json' (records.py: FFCV's format has no field for them), so
that a train.beton and a val.beton written by two calls can be checked to mean the same class by the
same label. Each .beton written is logged (INFO, logger crate_fast.data.writer).

The command line is write_ffcv.py (python -m crate_fast.data.write_ffcv).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from ._ffcv import require_ffcv
from .datasets import Images
from .folders import MIN_STORED_SIDE, Scan, scan_image_folder, storage_problem
from .records import check_class_names, record_path, write_record

log = logging.getLogger(__name__)

# A writer process found dead (a failed zombie of the writer's process group) ends the write once no
# sample has been written for this long: FFCV never waits for its workers, so one that ended stays a
# zombie, and the others may still finish their own samples first.
DEAD_GRACE_S = 2.0


class _Guarded:
    """The data set as FFCV's writer processes see it: it remembers the sample being written (for
    error messages) and refuses, with the reason, an image FFCV could not store."""

    def __init__(self, dataset, max_resolution: int | None):
        self.dataset, self.max_resolution, self.current = dataset, max_resolution, None

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        self.current = i
        image, label = self.dataset[i]
        problem = storage_problem(*np.shape(image)[:2], self.max_resolution)
        if problem:
            raise ValueError(problem)
        return image, label


def _report(err_path: str, message: str) -> None:
    """Publish `message` at err_path whole (written aside, then renamed): the parent may read it at once."""
    aside = f"{err_path}.{os.getpid()}"
    with open(aside, "w") as f:
        f.write(message)
    os.replace(aside, err_path)


def _die_with_parent(parent: int) -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG), so
    that no writer process outlives a killed parent, blocked forever on a queue nobody feeds."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)        # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the parent's watchdog and cleanup still apply
        return
    if os.getppid() != parent:        # the parent died before prctl took effect
        os._exit(1)


def _guard_ffcv_workers(ffcv_writer, dataset: _Guarded, err_path: str, done) -> None:
    """Patch FFCV's writer (in the forked child only) so that a worker that fails reports why and exits
    (FFCV's own dies with a traceback nobody reads, and the writer then waits for it forever), and
    every sample written is counted in `done`, which the parent's watchdog reads."""
    job, handle, child = ffcv_writer.worker_job_indexed_dataset, ffcv_writer.handle_sample, os.getpid()

    def counted_handle(*args, **kwargs):
        handle(*args, **kwargs)
        with done.get_lock():
            done.value += 1

    def guarded_job(*args, **kwargs):
        try:
            _die_with_parent(child)
            job(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - anything here ends the write, reported upstream
            where = "" if dataset.current is None else f"sample {dataset.current}: "
            _report(err_path, f"{where}{type(e).__name__}: {e}")
            os._exit(1)

    ffcv_writer.handle_sample = counted_handle
    ffcv_writer.worker_job_indexed_dataset = guarded_job


def _write_child(dataset: _Guarded, workdir: str, field_args: dict, workers: int, done, parent: int) -> None:
    os.setpgrp()                      # own process group: the parent can stop the writer and its workers
    _die_with_parent(parent)
    err_path = os.path.join(workdir, "error")
    try:
        import ffcv.writer as ffcv_writer
        from ffcv.fields import IntField, RGBImageField

        _guard_ffcv_workers(ffcv_writer, dataset, err_path, done)
        fields = {"image": RGBImageField(**field_args), "label": IntField()}
        writer = ffcv_writer.DatasetWriter(os.path.join(workdir, "out.beton"), fields, num_workers=workers)
        prepare = writer.prepare

        def prepare_and_record():     # the shared memory's name, for the parent to free if we are killed
            prepare()
            with open(os.path.join(workdir, "shm"), "w") as f:
                f.write(writer.metadata_sm.name)
        writer.prepare = prepare_and_record
        writer.from_indexed_dataset(dataset)
    except BaseException as e:  # noqa: BLE001
        _report(err_path, f"{type(e).__name__}: {e}")
        os._exit(1)


def _dead_in_group(pgid: int) -> list[str]:
    """The processes of group pgid that failed (killed by a signal or a nonzero exit code) and were never
    waited for (zombies), described. A worker that found no work left ends with 0 and is no failure."""
    dead = []
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:                   # no /proc: only the stall timeout watches the writer
        return dead
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()     # from field 3 (state) on: state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] == b"Z":
            status = int(fields[49]) if len(fields) > 49 else 0      # field 52: the wait status
            if status & 0x7F:
                dead.append(f"pid {pid}, killed by signal {status & 0x7F}")
            elif status >> 8:
                dead.append(f"pid {pid}, exit code {status >> 8}")
    return dead


def _watch(child, err_path: str, done, n: int, stall_timeout: float) -> str | None:
    """Wait for the writer child to end. Returns why the write failed, or None: the child's error
    report, a process of its group that died, no sample written for stall_timeout seconds, or the
    child's exit code."""
    last, since = -1, time.monotonic()
    while child.is_alive() and not os.path.exists(err_path):
        child.join(0.2)
        now, count = time.monotonic(), done.value
        if count != last:
            last, since = count, now
        elif now - since > stall_timeout:
            return f"no sample written for {stall_timeout:.0f} s ({count}/{n} done): a writer process is stuck"
        elif count < n and now - since > DEAD_GRACE_S:
            dead = _dead_in_group(child.pid)
            if dead:
                return f"a writer process died after {count}/{n} samples ({'; '.join(dead)})"
    if os.path.exists(err_path):
        return open(err_path).read().strip()
    return None if child.exitcode == 0 else f"the writer exited with code {child.exitcode}"


def write_beton(dataset, out: str, *, max_resolution: int | None = 256, jpeg_quality: int = 90,
                compress_probability: float = 0.5, workers: int = 1, stall_timeout: float = 600.0,
                classes: Sequence[str] | None = None) -> str:
    """Write an indexed data set of ((H, W, 3) uint8 array, int label) pairs to OUT atomically.
    Returns OUT's absolute path.

    max_resolution: longest side stored (None: full size); compress_probability: the fraction of
    images stored as JPEG of jpeg_quality, the rest raw. classes: the class names, label i being the
    i-th, recorded next to OUT (records.py), put in place just before OUT; None records none (and
    removes a record an earlier file at OUT left). Raises ValueError for out-of-range settings, class
    names that are not distinct strings, or a label outside range(len(classes)) (then nothing is
    written), and RuntimeError when the write fails (see the module docstring): a sample that raises or
    that FFCV cannot store (storage_problem), a writer process that dies, or none written for
    stall_timeout seconds. Then no process of the write is left running, and neither OUT nor a
    temporary file. ImportError when FFCV is missing.
    """
    import multiprocessing as mp
    import signal
    import threading

    out = os.path.abspath(out)
    classes = None if classes is None else check_class_names(classes)
    _check_settings(max_resolution, jpeg_quality, compress_probability)
    require_ffcv()                    # here, not in the child: a clear error, and no import time on the clock
    os.makedirs(os.path.dirname(out), exist_ok=True)
    workdir = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.writing-", dir=os.path.dirname(out))
    field_args = dict(write_mode="proportion", max_resolution=max_resolution,
                      compress_probability=compress_probability, jpeg_quality=jpeg_quality)
    ctx = mp.get_context("fork")
    done = ctx.Value("Q", 0)          # samples written, counted by the writer's processes
    child = ctx.Process(target=_write_child, args=(_Guarded(dataset, max_resolution), workdir, field_args,
                                                   max(1, workers), done, os.getpid()))
    written = False
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:                # SIGTERM (timeout, a scheduler, torchrun) would skip `finally`
        sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        child.start()
        error = _watch(child, os.path.join(workdir, "error"), done, len(dataset), stall_timeout)
        if error is not None:
            raise RuntimeError(f"writing {out} failed ({error}); nothing was written")
        _publish(workdir, out, classes, len(dataset))
        written = True
    finally:
        if child.pid is not None:
            _stop_group(child)
        shm = os.path.join(workdir, "shm")
        if not written and os.path.exists(shm):  # FFCV frees its shared memory only when it finishes
            try:
                os.remove(os.path.join("/dev/shm", open(shm).read().strip()))
            except OSError:
                pass
        shutil.rmtree(workdir, ignore_errors=True)
        if on_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if sigterm is None else sigterm)
    return out


def _check_settings(max_resolution: int | None, jpeg_quality: int, compress_probability: float) -> None:
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < MIN_STORED_SIDE:
        raise ValueError(f"max_resolution must be None or at least {MIN_STORED_SIDE}, got {max_resolution}")


def _publish(workdir: str, out: str, classes: list[str] | None, n: int) -> None:
    """Move the finished workdir/out.beton to OUT (atomic: OUT exists only once complete), its class-name
    record first (records.py), or without one, removing the record an earlier file at OUT left (it
    would describe another file). ValueError (nothing moved) for labels the class names do not cover."""
    beton, record = os.path.join(workdir, "out.beton"), record_path(out)
    if classes is not None:
        _check_labels(beton, len(classes))
        write_record(os.path.join(workdir, "classes.json"), classes, beton=beton, num_samples=n)
        os.replace(os.path.join(workdir, "classes.json"), record)
    elif os.path.exists(record):
        os.remove(record)
    os.replace(beton, out)
    log.info("wrote %s: %d samples", out, n)


def _check_labels(beton: str, num_classes: int) -> None:
    """ValueError when the written (not yet published) .beton holds a label outside range(num_classes):
    its class-name record would not cover it."""
    from ffcv.reader import Reader

    reader = Reader(beton)
    labels = reader.metadata[f"f{reader.field_names.index('label')}"]
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels {lo}..{hi} do not fit the {num_classes} class names given; nothing was written")


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _stop_group(child) -> None:
    """SIGKILL whatever is left of the writer child's process group, and reap the child."""
    import signal

    try:
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if child.is_alive():              # stopped before it made its own group
        child.kill()
    child.join()


def write_image_folder(src: str, out: str, *, workers: int | None = None, progress: bool = True,
                       max_resolution: int | None = 256, **kwargs) -> Scan:
    """ImageFolder SRC -> OUT.beton (see the module docstring), its class names recorded with it; kwargs
    (jpeg_quality, compress_probability, stall_timeout) go to write_beton. Returns the scan
    (folders.Scan), skipped files included. Raises like folders.scan_image_folder and write_beton."""
    workers = workers or os.cpu_count() or 1
    scan = scan_image_folder(src, workers, progress, max_resolution)
    write_beton(Images(scan.samples), out, workers=workers, max_resolution=max_resolution, classes=scan.classes,
                **kwargs)
    return scan
