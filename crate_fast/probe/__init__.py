"""Linear probe of a frozen encoder: features of every image, then scikit-learn's logistic regression.

How CRATE-MAE's encoders are evaluated (Pai et al., ICLR 2024, report linear-probe accuracies; the authors'
book, ch. 7: "precompute CLS features, fast linear solver e.g. scikit-learn"): the
encoder is frozen, each image gives one feature vector, a multinomial logistic regression is fitted on the
training features and scored on the validation ones. Any crate_fast model can be probed:

    CRATE-MAE            model.pooled(images, pool): its encoder on the whole image (no masking), after the
                         final LayerNorm, then the CLS token ("cls", the default) or the mean of the patch
                         tokens ("mean", CLS excluded: FAIR MAE's global pool)
    CRATE, CRATE-alpha   the features their classifier reads (timm's pre-logits): the tokens of
                         forward_features pooled, then the head's LayerNorm; "cls" takes token 0, "mean" the
                         mean of every token, CLS included (the official CRATE's mean pooling), so the pool
                         equal to the model's own gives exactly forward_head(tokens, pre_logits=True)

    python -m crate_fast.probe --ckpt runs/mae_digits/best.pt --data digits --loader torchvision
    python -m crate_fast.probe --ckpt crate-mae-base-lmd0.5-checkpoint-799.pth --arch mae_crate_base \\
        --data /data/imagenet --out probe.json

scikit-learn is optional for crate_fast (extras "data" and "dev" install it); the probe names it when missing.
The command line is this package's __main__.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sized

import numpy as np
import torch
from torch import nn

from ..models.base import POOLS, CRATEModel
from ..progress import Progress
from ..registry import family_of_config


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable, pool: str = "cls", device: str | torch.device | None = None,
                     progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features of every batch a loader yields: (X float32 (n, dim), y int64 (n,)), in loader order.

    model: a CRATE, CRATE-alpha or CRATE-MAE (what each gives: module docstring), run under no_grad in eval
    mode in its own dtype; its mode is restored afterwards. loader: any iterable of (images (B, C, H, W)
    float, labels (B,) int) batches, e.g. crate_fast.data.build_loaders' loaders (its images are what the
    features see: an augmenting training loader gives one random view of each image). device: where the
    images go (default: the model's device; the model must be there). progress: a progress bar / log lines.
    Raises ValueError for a pool other than "cls" / "mean" or a loader that yields nothing, TypeError for
    another kind of model."""
    _check_pool(pool)
    if not (isinstance(model, CRATEModel) and family_of_config(model.config).inputs == "images"):
        raise TypeError(f"the probe reads CRATE, CRATE-alpha and CRATE-MAE models, got {type(model).__name__}")
    param = next(model.parameters())
    device = param.device if device is None else torch.device(device)
    xs, ys = [], []
    was_training = model.training
    model.eval()
    steps = Progress(len(loader) if isinstance(loader, Sized) else 0, "features", enabled=progress)
    try:
        for images, labels in loader:
            feats = model.pooled(images.to(device, param.dtype, non_blocking=True), pool)   # module docstring
            xs.append(feats.float().cpu().numpy())
            ys.append(torch.as_tensor(labels).reshape(-1).cpu().numpy().astype(np.int64))
            steps.update(1)
    finally:
        steps.close()
        model.train(was_training)
    if not xs:
        raise ValueError("the loader yielded no batches: no features to probe (an empty data set, or fewer "
                         "samples than one batch on a loader that drops its last incomplete batch)")
    return np.concatenate(xs), np.concatenate(ys)


def linear_probe(model: nn.Module, train_loader: Iterable, val_loader: Iterable, pool: str = "cls", C: float = 1.0,
                 max_iter: int = 1000, *, device: str | torch.device | None = None,
                 gather: Callable[[np.ndarray], np.ndarray] | None = None, progress: bool = False) -> dict:
    """Fit a linear classifier on the frozen features of train_loader, score it on val_loader.

    Features: :func:`extract_features` (pool, device, progress as there). Both feature sets are
    standardized with a scikit-learn StandardScaler fitted on the training features, then a
    LogisticRegression(C, solver="lbfgs", max_iter) is fitted: the multinomial (softmax) loss for 3 or more
    classes, the logistic loss for 2, with an L2 penalty of weight 1 / C. Each loader's transform is what
    the probe sees: the digits recipes' loaders are deterministic (the whole image, no flip), a training
    loader of an ImageNet recipe gives one random crop + flip of each image, as FAIR MAE's main_linprobe.py
    trains its probe (the authors' book precomputes features of fixed views; build the loaders with
    scale=ratio=(1, 1), flip=False for that, as ``python -m crate_fast.probe`` does).
    gather: for distributed runs, maps this rank's array to every rank's, concatenated (rows in rank order);
    each rank then fits the same probe on all the features.
    Returns {"train_top1", "val_top1" (accuracies in percent), "n_train", "n_val", "dim", "seconds"
    (features and fit), "pool", "C", "n_iter" (lbfgs iterations; == max_iter: not converged, and
    scikit-learn warns)}.
    Raises ImportError without scikit-learn, ValueError for a bad pool, C <= 0, max_iter < 1, an empty
    loader or training labels of one class, TypeError for another kind of model.
    Sources: Pai et al., ICLR 2024 (linear probing); FAIR MAE main_linprobe.py (what is probed); the CRATE
    authors' book ch. 7 (scikit-learn on precomputed features)."""
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler
    except ImportError as e:
        raise ImportError("the linear probe needs scikit-learn: pip install scikit-learn") from e
    _check_pool(pool)
    if not C > 0:
        raise ValueError(f"C must be positive, got {C}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    t0 = time.perf_counter()
    (x_tr, y_tr), (x_va, y_va) = (extract_features(model, loader, pool, device, progress)
                                  for loader in (train_loader, val_loader))
    if gather is not None:
        x_tr, y_tr, x_va, y_va = (gather(a) for a in (x_tr, y_tr, x_va, y_va))
    if len(np.unique(y_tr)) < 2:
        raise ValueError(f"the training features hold one class ({y_tr[0]}): nothing for a classifier to separate")
    scaler = StandardScaler().fit(x_tr)
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter)
    clf.fit(scaler.transform(x_tr), y_tr)
    return {"train_top1": 100.0 * float(clf.score(scaler.transform(x_tr), y_tr)),
            "val_top1": 100.0 * float(clf.score(scaler.transform(x_va), y_va)),
            "n_train": int(len(y_tr)), "n_val": int(len(y_va)), "dim": int(x_tr.shape[1]),
            "seconds": time.perf_counter() - t0, "pool": pool, "C": float(C), "n_iter": int(np.max(clf.n_iter_))}
