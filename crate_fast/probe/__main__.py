"""``python -m crate_fast.probe``: a linear probe of a saved model's frozen features (crate_fast.probe).

    python -m crate_fast.probe --ckpt runs/mae_digits/best.pt --data digits --loader torchvision
    python -m crate_fast.probe --ckpt crate-mae-base-lmd0.5-checkpoint-799.pth --arch mae_crate_base \\
        --data /data/imagenet --out probe.json
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import torch

from ..checkpoint import load_model
from ..data import LoaderOptions, build_loaders
from ..data.sources import DEFAULT_CACHE
from . import POOLS, linear_probe


def main(argv=None) -> int:
    """The command line (module docstring). Returns 0, or 2 after printing `error: ...` for a missing or
    unreadable checkpoint, an unknown --arch or --data, a missing scikit-learn or FFCV, or a bad option."""
    ap = argparse.ArgumentParser(prog="python -m crate_fast.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", required=True, help="train.py checkpoint (best.pt / last.pt) or other weights")
    ap.add_argument("--arch", help="preset of weights that are not a run checkpoint (e.g. mae_crate_base)")
    ap.add_argument("--img-size", type=int, help="weights that do not record their model: training image size "
                                                 "(default: the preset's)")
    ap.add_argument("--patch-size", type=int, help="weights that do not record their model: patch size")
    ap.add_argument("--data", required=True, help="what train.py's --data takes: digits, cifar10, a folder, ...")
    ap.add_argument("--loader", choices=("ffcv", "torchvision"), default="ffcv")
    ap.add_argument("--pool", choices=POOLS, default="cls", help="CLS token or mean of the tokens (see above)")
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 weight of the logistic regression")
    ap.add_argument("--max-iter", type=int, default=1000, help="lbfgs iterations at most")
    ap.add_argument("--batch-size", type=int, default=64,
                    help="images per batch; the training loader drops its last incomplete batch")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--seed", type=int, default=0, help="sample order of the training loader")
    ap.add_argument("--cache-dir", default=DEFAULT_CACHE)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="also write the result as JSON to this file")
    ap.add_argument("--trust-checkpoint", action="store_true",
                    help="allow a checkpoint whose loading runs code from the file (only for files you trust)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise ValueError(f"--out {args.out!r}: its folder does not exist")
        model = load_model(args.ckpt, args.arch, args.img_size, args.patch_size, trusted=args.trust_checkpoint)
        device = torch.device(args.device)
        # build_loaders' training split always takes a RandomResizedCrop: with scale = ratio = (1, 1) and no
        # flip it is the center square of the short side (the whole image for square ones), resized: the same
        # deterministic view as the evaluation center crop with crop_pct = 1, so both splits are read alike.
        opts = LoaderOptions(batch_size=args.batch_size, img_size=model.config.img_size[0], num_workers=args.workers,
                             device=device, seed=args.seed, flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                             crop_pct=1.0)
        data = build_loaders(args.data, opts, loader=args.loader, cache_dir=args.cache_dir, data_root=args.data_root)
        result = linear_probe(model.to(device), data.train, data.val, pool=args.pool, C=args.C,
                              max_iter=args.max_iter, progress=True)
    except (OSError, ValueError, TypeError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {"ckpt": args.ckpt, "data": args.data, **result, "config": model.config.to_dict()}
    print(f"linear probe ({args.pool}, C={args.C:g}): train top-1 {result['train_top1']:.2f}%  "
          f"val top-1 {result['val_top1']:.2f}%  ({result['n_train']} / {result['n_val']} images, "
          f"{result['dim']} features, {result['seconds']:.1f}s)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
