"""ImageFolder trees (SRC/<class name>/<image files>): what they hold, and what FFCV can store of it.

- :func:`class_names`: the class folders, sorted; label i is the i-th name.
- :func:`scan_image_folder`: every image file of the class folders, each decoded once to leave out
  (listed, with the reason) what FFCV cannot store. The FFCV writer (writer.py) and the
  torchvision fallback (sources.py) both read this one list.
- :func:`folder_fingerprint`: a digest of the same files, which changes when any of them does (the key of
  the converted-data cache, sources.py).

The walk follows symbolic links to directories, as torchvision's ImageFolder and timm's folder parser
do (both walk with ``followlinks=True``): a class folder may hold links to folders of images kept
elsewhere. Unlike a plain ``os.walk(followlinks=True)`` it never loops on a link cycle (a link to a
folder above it) and lists each file once per class: a directory or file whose real path (links
resolved) was already reached another way is not listed again. Hidden files (``.name``) are left
out; files inside hidden subfolders are kept, as torchvision keeps them.
"""
from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

from .datasets import load_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
# FFCV's center crop keeps int(crop_pct * short side) pixels: from a 1-px side that is 0, and OpenCV
# aborts the whole loading process. A 0-px side (a thin image scaled down) fails in FFCV's writer.
MIN_STORED_SIDE = 2


@dataclass
class Scan:
    """What an ImageFolder tree holds: storable samples, and what was left out and why."""

    classes: list[str]
    samples: list[tuple[str, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)     # (path, reason)


def class_names(src: str) -> list[str]:
    """The class folders of an ImageFolder tree (links to folders included), sorted: label i is the
    i-th name. Raises FileNotFoundError for a missing SRC, ValueError for one without class folders."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"image folder {src!r} does not exist or is not a directory")
    classes = sorted(d.name for d in os.scandir(src) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{src!r} has no class folders: expected SRC/<class>/<image files> (ImageFolder layout)")
    return classes


def _files_under(top: str, errors: list | None):
    """Paths of the non-hidden files under directory `top`, depth first in sorted order (os.walk's
    top-down order, made independent of the file system's listing order), following links to
    directories. Each directory and each file is visited once, known by its real path (links resolved):
    a link back up the tree (a cycle) or a second way to the same folder or file adds nothing. A
    directory that cannot be listed is appended to `errors` as (path, reason), when given."""
    seen_dirs, seen_files = set(), set()
    stack = [top]
    while stack:
        folder = stack.pop()
        real = os.path.realpath(folder)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:              # unreadable (permissions) or gone: os.walk would drop it silently
            if errors is not None:
                errors.append((folder, f"cannot list the folder ({type(e).__name__}: {e.strerror or e})"))
            continue
        subfolders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()                   # follows a link, as os.walk(followlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                subfolders.append(entry.path)
            elif not entry.name.startswith("."):
                # Real path: the folder's (resolved once per folder) and the name; only a link to a
                # file needs resolving itself (a dangling one resolves to where it points).
                key = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                if key not in seen_files:
                    seen_files.add(key)
                    yield entry.path
        stack.extend(reversed(subfolders))            # popped in sorted order


def _walk(src: str, classes: list[str], errors: list | None = None):
    """(label, path) of every non-hidden file under each class folder, in a fixed order (see the module
    docstring: links followed, each file once per class). Folders that cannot be listed go to
    `errors` as (path, reason), when given."""
    for label, name in enumerate(classes):
        for path in _files_under(os.path.join(src, name), errors):
            yield label, path


def folder_fingerprint(src: str) -> str:
    """A hex digest of everything converting SRC reads: the class names and, for every file the scan
    lists (the same walk, links followed), its path relative to SRC, size and modification time. It
    changes when a file is added, removed, renamed or rewritten, behind a link too. Raises like
    class_names."""
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
    for label, path in _walk(src, classes, scan.skipped):
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
    """List SRC/<class>/<images> (see the module docstring), decoding every image once to leave out (in
    `skipped`, with the reason) the files FFCV could not store at max_resolution, and the folders that
    could not be listed. Raises FileNotFoundError / ValueError for a missing tree, one without class
    folders or images, or one where nothing is storable."""
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
