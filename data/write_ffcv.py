"""Write an ImageFolder tree (class folders of image files) to an FFCV .beton file.

    python -m crate_fast.data.write_ffcv SRC OUT.beton [--max-resolution 256] [--jpeg-quality 90]
                                        [--compress-probability 0.5] [--workers N]

Every image is decoded once before writing (datasets.load_rgb: upright as shown, 16-bit and other
modes mapped to 8-bit RGB by their real range). Files that cannot be stored are skipped, counted and
listed at the end, never a crash halfway: unreadable or corrupt files, images without a faithful RGB
form, and images too thin for FFCV (a side below MIN_STORED_SIDE px once FFCV has scaled the longest
side down to --max-resolution: a 0-px side crashes FFCV's writer, a 1-px side its center crop).

The result is atomic, and the write always ends. It runs in a watched child process: a failing
sample, a writer process that errors or dies, one that makes no progress for `stall_timeout` seconds,
Ctrl-C or SIGTERM stops all of its processes with a clear error, and neither OUT nor any temporary
file (nor FFCV's shared memory) is left behind; a parent killed outright (SIGKILL) takes the writer's
processes with it, leaving only its hidden .OUT.writing-* folder. The .beton is written under a
temporary name and renamed only when complete. Defaults follow FFCV's ImageNet recipe (max side 256,
JPEG quality 90, half the images JPEG).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from ._ffcv import require_ffcv
from .datasets import Images, load_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# FFCV's center crop keeps int(crop_pct * short side) pixels: from a 1-px side that is 0, and OpenCV
# aborts the whole loading process. A 0-px side (a thin image scaled down) fails in FFCV's writer.
MIN_STORED_SIDE = 2
# A writer process found dead (a failed zombie of the writer's process group) ends the write once no
# sample has been written for this long: FFCV never waits for its workers, so one that ended stays a
# zombie, and the others may still finish their own samples first.
DEAD_GRACE_S = 2.0


@dataclass
class Scan:
    """What an ImageFolder tree holds: storable samples, and what was left out and why."""

    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)     # (path, reason)


def class_names(src: str) -> list[str]:
    """The class folders of an ImageFolder tree, sorted: label i is the i-th name."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"image folder {src!r} does not exist or is not a directory")
    classes = sorted(d.name for d in os.scandir(src) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{src!r} has no class folders: expected SRC/<class>/<image files> (ImageFolder layout)")
    return classes


def _walk(src: str, classes: list[str]):
    """(label, path) of every non-hidden file under each class folder, in a fixed order."""
    for label, name in enumerate(classes):
        for root, dirs, files in os.walk(os.path.join(src, name)):
            dirs.sort()                   # os.walk lists in directory order, which differs between file systems
            for f in sorted(files):
                if not f.startswith("."):
                    yield label, os.path.join(root, f)


def folder_fingerprint(src: str) -> str:
    """A hex digest of everything converting SRC reads: the class names and, for every file in the class
    folders, its path relative to SRC, size and modification time. It changes when a file is added,
    removed, renamed or rewritten. Raises like class_names."""
    classes = class_names(src)
    digest = hashlib.sha256(repr(classes).encode())
    for _, path in _walk(src, classes):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:                   # e.g. a dangling link: the scan skips it; its name still counts
            stamp = "unreadable"
        digest.update(os.fsencode(os.path.relpath(path, src)) + f"\0{stamp}\n".encode())
    return digest.hexdigest()


def _list_tree(src: str) -> Scan:
    classes = class_names(src)
    scan = Scan(classes)
    for label, path in _walk(src, classes):
        if path.lower().endswith(IMAGE_EXTENSIONS):
            scan.samples.append((path, label))
        else:
            scan.skipped.append((path, "not an image file"))
    if not scan.samples:
        raise ValueError(f"{src!r} has class folders but no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return scan


def stored_size(height: int, width: int, max_resolution: int | None) -> tuple[int, int]:
    """(height, width) FFCV stores an image at: its resize of the longest side to max_resolution
    (None: full size), truncating the other side as FFCV does (ffcv.fields.rgb_image.resizer)."""
    ratio = 1.0 if max_resolution is None else max_resolution / max(height, width)
    if ratio >= 1:
        return height, width
    return int(ratio * height), int(ratio * width)


def storage_problem(height: int, width: int, max_resolution: int | None) -> str | None:
    """Why FFCV cannot store an image of this size at max_resolution (see MIN_STORED_SIDE), or None."""
    h, w = stored_size(height, width, max_resolution)
    if min(h, w) >= MIN_STORED_SIDE:
        return None
    return (f"too thin: {width}x{height} px becomes {w}x{h} px at max resolution {max_resolution}; FFCV needs "
            f"{MIN_STORED_SIDE} px a side (a 0-px side fails its writer, a 1-px side aborts its center crop)")


def _check(path: str, max_resolution: int | None) -> str | None:
    try:
        height, width = load_rgb(path).shape[:2]
    except Exception as e:  # any decoder or conversion error means: skip this file and say why
        return f"{type(e).__name__}: {e}"[:200]
    return storage_problem(height, width, max_resolution)


def scan_image_folder(src: str, workers: int = 1, progress: bool = True,
                      max_resolution: int | None = 256) -> Scan:
    """List SRC/<class>/<images>, decoding every image once to leave out (in `skipped`, with the
    reason) the files FFCV could not store at max_resolution. Raises FileNotFoundError / ValueError
    for a missing tree, one without class folders or images, or one where nothing is storable."""
    from tqdm import tqdm

    scan = _list_tree(src)
    paths = [p for p, _ in scan.samples]
    check = functools.partial(_check, max_resolution=max_resolution)
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = list(tqdm(pool.map(check, paths, chunksize=64), total=len(paths), disable=not progress,
                           desc="checking images", unit="img"))
    good = []
    for (path, label), err in zip(scan.samples, errors, strict=True):
        if err is None:
            good.append((path, label))
        else:
            scan.skipped.append((path, err))
    scan.samples = good
    if not good:
        raise ValueError(f"no storable image in {src!r} ({len(scan.skipped)} files skipped)")
    return scan


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
                compress_probability: float = 0.5, workers: int = 1, stall_timeout: float = 600.0) -> str:
    """Write an indexed data set of ((H, W, 3) uint8 array, int label) pairs to OUT atomically.
    Returns OUT's absolute path.

    max_resolution: longest side stored (None: full size); compress_probability: the fraction of
    images stored as JPEG of jpeg_quality, the rest raw. Raises ValueError for out-of-range settings,
    and RuntimeError when the write fails (see the module docstring): a sample that raises or that FFCV
    cannot store (storage_problem), a writer process that dies, or none written for stall_timeout
    seconds. Then no process of the write is left running, and neither OUT nor a temporary file.
    ImportError when FFCV is missing.
    """
    import multiprocessing as mp
    import signal
    import threading

    out = os.path.abspath(out)
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    if max_resolution is not None and max_resolution < MIN_STORED_SIDE:
        raise ValueError(f"max_resolution must be None or at least {MIN_STORED_SIDE}, got {max_resolution}")
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
        os.replace(os.path.join(workdir, "out.beton"), out)     # atomic: OUT exists only once complete
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
    """ImageFolder SRC -> OUT.beton (see the module docstring); kwargs go to write_beton. Returns the
    scan, skipped files included. Raises like scan_image_folder and write_beton."""
    workers = workers or os.cpu_count() or 1
    scan = scan_image_folder(src, workers, progress, max_resolution)
    write_beton(Images(scan.samples), out, workers=workers, max_resolution=max_resolution, **kwargs)
    return scan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m crate_fast.data.write_ffcv", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="ImageFolder root: SRC/<class name>/<image files>")
    ap.add_argument("out", help="output .beton path")
    ap.add_argument("--max-resolution", type=int, default=256, help="longest side stored (0: keep full size)")
    ap.add_argument("--jpeg-quality", type=int, default=90)
    ap.add_argument("--compress-probability", type=float, default=0.5,
                    help="fraction of images stored as JPEG (the rest raw: faster to decode, larger)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    args = ap.parse_args(argv)
    try:
        scan = write_image_folder(args.src, args.out, workers=args.workers,
                                  max_resolution=args.max_resolution or None, jpeg_quality=args.jpeg_quality,
                                  compress_probability=args.compress_probability)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:         # the write itself failed (write_beton): nothing was written
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {len(scan.samples)} images, {len(scan.classes)} classes")
    if scan.skipped:
        print(f"skipped {len(scan.skipped)} files:")
        for path, why in scan.skipped:
            print(f"  {path}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
