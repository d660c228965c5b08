"""Write an ImageFolder tree (class folders of image files) to an FFCV .beton file.

    python -m crate_fast.data.write_ffcv SRC OUT.beton [--max-resolution 256] [--jpeg-quality 90]
                                        [--compress-probability 0.5] [--workers N]

Every image is decoded once; files that cannot be stored are skipped and listed at the end. The
result is atomic and the write always ends (writer.py). The class names (SRC's sorted class folders;
label i is the i-th) are recorded next to OUT, in OUT.classes.json, so that a train.beton and a
val.beton written by two calls can be checked to agree: train.py refuses a pair that does not.
Defaults follow FFCV's ImageNet recipe (max side 256, JPEG quality 90, half the images JPEG).

This module is the command line only; the writer is writer.py (write_beton and write_image_folder are
importable from here too), the folder scanning folders.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from .records import record_path
from .writer import write_beton, write_image_folder

__all__ = ["main", "write_beton", "write_image_folder"]


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
    print(f"wrote {args.out}: {len(scan.samples)} images, {len(scan.classes)} classes "
          f"(their names in {record_path(os.path.abspath(args.out))})")
    if scan.skipped:
        print(f"skipped {len(scan.skipped)} files:")
        for path, why in scan.skipped:
            print(f"  {path}: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
