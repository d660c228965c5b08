"""Write an ImageFolder tree (class folders of JPEG/PNG files) to an FFCV .beton file.

    python -m crate_fast.data.write_ffcv SRC OUT.beton [--max-resolution 256] [--jpeg-quality 90]
                                        [--compress-probability 0.5] [--workers N]

Every image is decoded once before writing: unreadable or corrupt files are skipped, counted and
listed at the end, never a crash halfway. The result is atomic: the .beton is written under a
temporary name and renamed only when complete, so an interrupted run never leaves a file that looks
valid. Defaults follow FFCV's ImageNet recipe (max side 256, JPEG quality 90, half the images JPEG).
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Scan:
    """What an ImageFolder tree holds: readable samples, and what was left out and why."""

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


def _list_tree(src: str) -> Scan:
    classes = class_names(src)
    scan = Scan(classes)
    for label, name in enumerate(classes):
        for root, _, files in os.walk(os.path.join(src, name)):
            for f in sorted(files):
                path = os.path.join(root, f)
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    scan.samples.append((path, label))
                elif not f.startswith("."):
                    scan.skipped.append((path, "not an image file"))
    if not scan.samples:
        raise ValueError(f"{src!r} has class folders but no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return scan


def load_rgb(path: str) -> np.ndarray:
    """Decode an image fully to an (H, W, 3) uint8 array (raises on corrupt or truncated files)."""
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _check(path: str) -> str | None:
    try:
        load_rgb(path)
    except Exception as e:  # any decoder error means: skip this file and say why
        return f"{type(e).__name__}: {e}"[:200]
    return None


def scan_image_folder(src: str, workers: int = 1, progress: bool = True) -> Scan:
    """List SRC/<class>/<images>, decoding every image once to find unreadable ones."""
    from tqdm import tqdm

    scan = _list_tree(src)
    paths = [p for p, _ in scan.samples]
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = list(tqdm(pool.map(_check, paths, chunksize=64), total=len(paths), disable=not progress,
                           desc="checking images", unit="img"))
    good = []
    for (path, label), err in zip(scan.samples, errors):
        if err is None:
            good.append((path, label))
        else:
            scan.skipped.append((path, err))
    scan.samples = good
    if not good:
        raise ValueError(f"no readable image in {src!r} ({len(scan.skipped)} files skipped)")
    return scan


class ImageFiles:
    """Indexed (HxWx3 uint8 array, label) pairs decoded from (path, label) samples."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return load_rgb(path), label


class _Guarded:
    """Runs in FFCV's writer processes: the first failing sample is written to err_path and the worker
    exits, so the watching parent can stop the whole write (FFCV itself would wait forever)."""

    def __init__(self, dataset, err_path: str):
        self.dataset, self.err_path = dataset, err_path

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.dataset[i]
        except BaseException as e:  # noqa: BLE001 - anything here ends the write, reported upstream
            with open(self.err_path, "a") as f:
                f.write(f"sample {i}: {type(e).__name__}: {e}\n")
            os._exit(1)


def _write_child(dataset, tmp: str, err_path: str, field_args: dict, workers: int) -> None:
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    os.setpgrp()                      # own process group: the parent can stop the writer and its workers
    try:
        fields = {"image": RGBImageField(**field_args), "label": IntField()}
        DatasetWriter(tmp, fields, num_workers=workers).from_indexed_dataset(_Guarded(dataset, err_path))
    except BaseException as e:  # noqa: BLE001
        with open(err_path, "a") as f:
            f.write(f"{type(e).__name__}: {e}\n")
        os._exit(1)


def write_beton(dataset, out: str, *, max_resolution: int | None = 256, jpeg_quality: int = 90,
                compress_probability: float = 0.5, workers: int = 1) -> str:
    """Write an indexed dataset of (HxWx3 uint8 array, int label) to OUT atomically. Returns OUT.

    The write runs in a watched child process: a failing sample, a dead worker or Ctrl-C stops it
    cleanly with an error, and neither OUT nor a temporary file is left behind."""
    import multiprocessing as mp
    import signal

    out = os.path.abspath(out)
    if not 0.0 <= compress_probability <= 1.0:
        raise ValueError(f"compress_probability must be in [0, 1], got {compress_probability}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp, err_path = f"{out}.tmp-{os.getpid()}", f"{out}.err-{os.getpid()}"
    field_args = dict(write_mode="proportion", max_resolution=max_resolution,
                      compress_probability=compress_probability, jpeg_quality=jpeg_quality)
    child = mp.get_context("fork").Process(target=_write_child,
                                           args=(dataset, tmp, err_path, field_args, max(1, workers)))
    try:
        child.start()
        while child.is_alive() and not os.path.exists(err_path):
            child.join(0.2)
        failed = os.path.exists(err_path) or child.exitcode != 0
        if failed:
            error = open(err_path).read().strip() if os.path.exists(err_path) else f"exit code {child.exitcode}"
            raise RuntimeError(f"writing {out} failed ({error}); nothing was written")
        os.replace(tmp, out)          # atomic: OUT exists only once it is complete
    finally:
        if child.is_alive():          # Ctrl-C or an error: stop the writer and all of its workers
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.join()
        for path in (tmp, err_path):
            if os.path.exists(path):
                os.remove(path)
    return out


def write_image_folder(src: str, out: str, *, workers: int | None = None, progress: bool = True,
                       **kwargs) -> Scan:
    """ImageFolder SRC -> OUT.beton (see the module docstring). Returns the scan, skipped files included."""
    workers = workers or os.cpu_count() or 1
    scan = scan_image_folder(src, workers, progress)
    write_beton(ImageFiles(scan.samples), out, workers=workers, **kwargs)
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
    print(f"wrote {args.out}: {len(scan.samples)} images, {len(scan.classes)} classes")
    if scan.skipped:
        print(f"skipped {len(scan.skipped)} files:")
        for path, why in scan.skipped:
            print(f"  {path}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
