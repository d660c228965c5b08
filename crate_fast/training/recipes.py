"""Training recipes: what train.py does by default for each ``--data`` source (any flag overrides them), and
``resolve``: a run's flags filled from its recipe and the machine, then checked before anything runs.

Each recipe is a dict of train.py option names. Sources (docs/DESIGN.md §8):
- imagenet (any train/ val/ folder or .beton directory): the CRATE NeurIPS paper's recipe, Lion, lr
  2.4e-4, weight decay 0.5, batch 2048, 150 epochs, 5 warmup, crop + flip, label smoothing 0.1. (The
  official README's 2e-4 / 0.05 / 512 / 200 and main.py's AdamW 4e-4 / 0.1 / 256 / 90 differ; the paper's
  numbers are the ones it reports.)
- cifar10 / cifar100 / pets / flowers102: the official finetune.py (AdamW, weight decay 0.01, cosine,
  no warmup, RandAugment(2, 14) per image).
- digits: the README's CPU job (8x8 digits upscaled to 32 px, trained at 16 px / patch 4).
- synthetic: random tensors on the device, for throughput runs.

Named recipes (``train.py --recipe NAME``; a family whose objective is not classification takes its
objective's recipe by default: OBJECTIVE_RECIPES), docs/DESIGN.md §8:
- crate_alpha_in21k: CRATE-alpha's ImageNet-21K pretraining (official configs/crate/classification/
  pre_training_in21k.py): Adam (0.9, 0.95) with decoupled weight decay 0.1 on the kernels only, clip 1.0,
  base lr 5e-5 per 256 images at batch 4096, 91 epochs, 10 warmup, cosine to 1e-6, Inception crop
  (area 8-100%) + flip, mixup 0.8 / cutmix 1.0 / switch 0.5, no label smoothing, no RandAugment.
- crate_alpha_in1k_ft: its ImageNet-1K fine-tuning (fine_tuning_in1k.py): the same with base lr 1e-5,
  RandAugment(2, 9) and label smoothing 0.1 (on 0.9 / off 1e-4 there; timm's 0.1 gives 0.9001 / 1e-4).
- mae_pretrain: CRATE-MAE pretraining as FAIR's main_pretrain.py runs it with the paper's settings
  (Pai et al. 2024; the authors' book ch. 7): AdamW (0.9, 0.95), weight decay 0.1 except 1-D tensors and
  biases, base lr 3e-5 per 256 images (as printed) at batch 4096, 800 epochs, 40 warmup, per-iteration
  warmup + cosine, RandomResizedCrop(0.2-1) + flip, mask ratio 0.75.
- mae_digits: the CPU demo of CRATE-MAE on the digits set (with the mae_crate_digits preset: 4 layers of
  width 192), FAIR's loop at blr 2e-3 for 60 epochs: it learns to reconstruct from context in ~2 min.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os

import torch

from crate_fast.data.sources import kind_of
from crate_fast.kernels import IMPLS
from crate_fast.registry import FAMILIES, family_of, get_config, list_models

from . import graphs, loggers

logger = logging.getLogger(__name__)

_FINETUNE = dict(img_size=224, patch_size=16, batch_size=256, opt="adamw", weight_decay=0.01, warmup_epochs=0,
                 label_smoothing=0.0, randaugment=True)

RECIPES: dict[str, dict] = {
    "imagenet": dict(img_size=224, patch_size=16, epochs=150, batch_size=2048, opt="lion", lr=2.4e-4,
                     weight_decay=0.5, warmup_epochs=5, label_smoothing=0.1),
    # Digits are not flip-invariant, and whole-image crops keep the run bitwise reproducible (FFCV's
    # random crops are unseeded).
    "digits": dict(img_size=16, patch_size=4, epochs=12, batch_size=64, opt="adamw", lr=1e-3, weight_decay=0.05,
                   warmup_epochs=1, label_smoothing=0.1, flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                   crop_pct=1.0, workers=2),
    "synthetic": dict(img_size=224, patch_size=16, epochs=1, batch_size=256, opt="lion", lr=2.4e-4,
                      weight_decay=0.5, warmup_epochs=0, label_smoothing=0.1),
    "cifar10": dict(_FINETUNE, epochs=200, lr=5e-5),
    "cifar100": dict(_FINETUNE, epochs=200, lr=5e-5),
    "pets": dict(_FINETUNE, epochs=400, lr=1e-4),
    "flowers102": dict(_FINETUNE, epochs=400, lr=1e-4),
}

_ALPHA = dict(img_size=224, epochs=91, batch_size=4096, opt="adamw", betas=(0.9, 0.95), weight_decay=0.1,
              wd_exclude=True, warmup_epochs=10, min_lr=1e-6, grad_clip=1.0, scale=(0.08, 1.0),
              mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5)
RECIPES.update({
    "crate_alpha_in21k": dict(_ALPHA, blr=5e-5, label_smoothing=0.0, randaugment=False),
    "crate_alpha_in1k_ft": dict(_ALPHA, blr=1e-5, label_smoothing=0.1, randaugment=True, ra_magnitude=9),
    "mae_pretrain": dict(img_size=224, patch_size=16, epochs=800, batch_size=4096, opt="adamw", betas=(0.9, 0.95),
                         blr=3e-5, weight_decay=0.1, wd_exclude=True, warmup_epochs=40, scale=(0.2, 1.0),
                         mask_ratio=0.75, label_smoothing=0.0),
    # Measured (docs/TRAINING.md): mae_crate_digits falls below the per-position mean after ~25 epochs and
    # reaches 0.79 at 60 (blr 1e-3: 0.91; 4e-3 diverges to the mean and back); the 12-layer tiny plateaus.
    "mae_digits": dict(img_size=16, patch_size=4, epochs=60, batch_size=64, opt="adamw", betas=(0.9, 0.95),
                       blr=2e-3, weight_decay=0.05, wd_exclude=True, warmup_epochs=5, mask_ratio=0.75,
                       label_smoothing=0.0, flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0), crop_pct=1.0,
                       workers=2),
    # crate-lm's GPT-2 recipe (the CRATE book, ch. 7: OpenWebText): AdamW (0.9, 0.95), weight decay 0.1 on the
    # tensors of 2 or more dimensions, lr 6e-4 after 2000 warmup steps, cosine to 6e-5 at 600k steps, 384
    # sequences of 1024 tokens per step, clip 1.0; an "epoch" is crate-lm's eval interval, 1000 steps,
    # validated on 200 batches.
    "crate_gpt_owt": dict(epochs=600, epoch_steps=1000, val_steps=200, batch_size=384, opt="adamw",
                          betas=(0.9, 0.95), lr=6e-4, min_lr=6e-5, weight_decay=0.1, wd_exclude=True,
                          warmup_epochs=2, grad_clip=1.0, label_smoothing=0.0),
    # The CPU demo on the embedded corpus (crate_gpt_tiny, bytes): nanoGPT's Shakespeare-char settings
    # (lr 1e-3 to 1e-4, beta2 0.99, clip 1.0) at a size 2 cores train in a few minutes.
    "crate_gpt_pydocs": dict(epochs=10, epoch_steps=50, val_steps=8, batch_size=16, opt="adamw", betas=(0.9, 0.99),
                             lr=1e-3, min_lr=1e-4, weight_decay=0.1, wd_exclude=True, warmup_epochs=0.5,
                             grad_clip=1.0, label_smoothing=0.0),
})

# What no recipe sets: ImageNet-style augmentation (timm's names: RandomResizedCrop scale and aspect
# ratio, evaluation center-crop fraction) and optimizer betas.
DEFAULTS = dict(flip=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), crop_pct=224 / 256, randaugment=False,
                ra_magnitude=14, min_lr=0.0, wd_exclude=False, grad_clip=0.0, mixup=0.0, cutmix=0.0,
                mixup_prob=1.0, mixup_switch_prob=0.5)
BETAS = {"lion": (0.9, 0.99), "adamw": (0.9, 0.999)}


# The recipe a family whose objective is not plain classification takes when --recipe is not given:
# {objective: {data kind: recipe, None: the recipe for any other data}}.
OBJECTIVE_RECIPES = {"masked_autoencoding": {"digits": "mae_digits", None: "mae_pretrain"},
                     "language_modeling": {"pydocs": "crate_gpt_pydocs", None: "crate_gpt_owt"}}
# The --data kinds that hold token ids (the language models' inputs); the others hold images.
TOKEN_KINDS = ("pydocs", "token_dir")
# torch.compile modes; the two with CUDA graphs replay whole forward / backward graphs, removing the
# per-kernel launch cost that dominates an eager CRATE step on a slow host.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def recipe_for(data: str, name: str | None = None, objective: str = "classification") -> tuple[str, dict]:
    """(recipe name, recipe): the named one, else the --data source's (folders and .beton directories are
    ImageNet-style; OBJECTIVE_RECIPES for other objectives). Raises ValueError for an unknown name, and
    what crate_fast.data.sources.kind_of raises for a source that does not exist."""
    if name is not None:
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
        return name, RECIPES[name]
    kind = kind_of(data)
    if objective in OBJECTIVE_RECIPES:
        by_kind = OBJECTIVE_RECIPES[objective]
        name = by_kind.get(kind, by_kind[None])
    else:
        name = kind if kind in RECIPES else "imagenet"
    return name, RECIPES[name]


def model_flags() -> list[str]:
    """Every train.py flag that sets a model config field of some family (their train_fields), in the
    order the families declare them."""
    return list(dict.fromkeys(f for fam in FAMILIES.values() for f in fam.train_fields))


def model_overrides(cfg, num_classes: int | None = None) -> dict:
    """The --arch model's config fields set by flags (or the recipe): its family's train_fields, plus the
    data's class count for a classifier. A flag the family does not have is an error unless it is left at
    its default. Raises SystemExit("error: ...")."""
    fam = family_of(cfg.arch)
    fields = fam.config_class.__dataclass_fields__
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    out = {"num_classes": num_classes} if num_classes is not None and "num_classes" in fields else {}
    for name in model_flags():
        value = getattr(cfg, name)
        if name in fam.train_fields and value is not None:
            out[name] = value
        elif name not in fam.train_fields and value is not None and value != defaults[name]:
            raise SystemExit(f"error: --{name.replace('_', '-')} does not apply to {fam.title} models ({cfg.arch})")
    return out


def _filled(cfg, recipe: dict):
    """cfg with every None taken from the recipe, DEFAULTS and the machine."""
    values = {k: (v if v is not None else recipe.get(k, DEFAULTS.get(k))) for k, v in dataclasses.asdict(cfg).items()}
    if cfg.lr is None and values["blr"] is not None:          # FAIR's rule: lr = blr x effective batch / 256
        values["lr"] = values["blr"] * values["batch_size"] / 256
    if values["betas"] is None:
        values["betas"] = BETAS.get(values["opt"])
    # the node's cores shared by its ranks (torchrun sets LOCAL_WORLD_SIZE)
    values["workers"] = values["workers"] or max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    values["device"] = values["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    values["precision"] = values["precision"] or ("bf16" if values["device"].startswith("cuda") else "fp32")
    return dataclasses.replace(cfg, **values)


def _checks(out, data_kind: str) -> list[tuple[bool, str]]:
    """(ok, message) for every flag value that makes no sense on its own."""
    pair = lambda v, lo, hi: v is not None and len(v) == 2 and lo <= v[0] <= v[1] <= hi  # noqa: E731
    return [
        (out.opt in BETAS, f"--opt must be lion or adamw, got {out.opt!r}"),
        (out.precision in ("bf16", "fp16", "fp32"), f"--precision must be bf16, fp16 or fp32, got {out.precision!r}"),
        (out.loader in ("ffcv", "torchvision"), f"--loader must be ffcv or torchvision, got {out.loader!r}"),
        (out.blr is None or out.blr > 0, f"--blr must be positive, got {out.blr}"),
        (out.epochs > 0 and out.batch_size > 0 and out.lr > 0, "epochs, batch size and lr must be positive"),
        (out.accum_steps >= 1, "--accum-steps must be >= 1"),
        (out.compile_mode in COMPILE_MODES, f"--compile-mode must be one of {COMPILE_MODES}, got {out.compile_mode!r}"),
        (out.compile or out.compile_mode == "default", "--compile-mode needs --compile"),
        (out.device in ("cpu", "cuda") or out.device.startswith("cuda:"), f"--device {out.device!r}"),
        (not out.device.startswith("cuda") or torch.cuda.is_available(), "--device cuda but no GPU is visible"),
        (out.impl in IMPLS, f"--impl must be one of {IMPLS}, got {out.impl!r}"),
        (out.impl != "triton" or out.device.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1",
         "--impl triton needs a GPU (--device cuda); use --impl torch or auto on the CPU"),
        (pair(out.scale, 1e-6, 1.0), f"--scale must be two numbers 0 < min <= max <= 1, got {out.scale}"),
        (pair(out.ratio, 1e-6, 1e6), f"--ratio must be two numbers 0 < min <= max, got {out.ratio}"),
        (0 < out.crop_pct <= 1, f"--crop-pct must be in (0, 1], got {out.crop_pct}"),
        (out.workers >= 0 and out.warmup_epochs >= 0, "--workers and --warmup-epochs must be >= 0"),
        (0 <= out.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {out.label_smoothing}"),
        (out.mixup >= 0 and out.cutmix >= 0, "--mixup and --cutmix must be >= 0"),
        (0 <= out.mixup_prob <= 1 and 0 <= out.mixup_switch_prob <= 1,
         "--mixup-prob and --mixup-switch-prob must be in [0, 1]"),
        (0 <= out.ra_magnitude <= 30, f"--ra-magnitude must be in 0..30, got {out.ra_magnitude}"),
        (out.grad_clip >= 0 and out.min_lr >= 0, "--grad-clip and --min-lr must be >= 0"),
        (out.min_lr <= out.lr, f"--min-lr {out.min_lr:g} is above the peak lr {out.lr:g} (a small --batch-size "
         "scales a --blr recipe's lr down): lower --min-lr"),
        (out.mask_ratio is None or 0 < out.mask_ratio < 1,
         f"--mask-ratio must be in (0, 1): pretraining reconstructs masked patches, got {out.mask_ratio}"),
        (not (out.randaugment and data_kind == "synthetic"),
         "RandAugment needs uint8 images and --data synthetic gives random floats: add --no-randaugment"),
    ]


def _family_checks(out, model_cfg, data_kind: str) -> list[tuple[bool, str]]:
    """(ok, message) for what this family's objective and this model's sizes allow."""
    fam = family_of(out.arch)
    objective = fam.objective
    mixing = out.mixup > 0 or out.cutmix > 0
    patch = model_cfg.patch_size[0] if hasattr(model_cfg, "patch_size") else 1
    prog = out.progressive
    tokens = data_kind in TOKEN_KINDS
    return [
        (tokens == (fam.inputs == "tokens"), f"--data {out.data} holds {'token ids' if tokens else 'images'}; "
         f"{fam.title} models read {fam.inputs}: pick another --arch or --data"),
        (not mixing or objective == "classification", f"--mixup/--cutmix mix labels; {fam.title} pretraining has none"),
        (not out.probe or objective == "masked_autoencoding",
         "--probe (a linear probe of the encoder) is for CRATE-MAE runs"),
        (not mixing or importlib.util.find_spec("timm") is not None, "--mixup/--cutmix need timm (pip install timm)"),
        (prog is None or (len(prog) == 3 and 0 < prog[0] <= prog[1] and prog[2] >= 1),
         f"--progressive must be START_RES,END_RES,END_EPOCH with START <= END and END_EPOCH >= 1, got {prog}"),
        (prog is None or len(prog) != 3 or (prog[0] % patch == 0 and prog[1] % patch == 0),
         f"--progressive resolutions must be multiples of the patch size {patch}, got {prog}"),
    ]


def resolve(cfg):
    """Fill every None of a TrainConfig from the recipe and the machine, then check the result (the flags,
    then the model's own config checks) before any data is prepared. Returns the filled copy.
    Raises SystemExit("error: ...") naming the flag and the fix."""
    if cfg.arch not in list_models():
        raise SystemExit(f"error: --arch must be one of {list_models()}, got {cfg.arch!r}")
    try:
        data_kind = kind_of(cfg.data)
        recipe = recipe_for(cfg.data, cfg.recipe, family_of(cfg.arch).objective)[1]
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {'--recipe: ' if cfg.recipe and 'recipe' in str(e) else ''}{e}") from e
    out = _filled(cfg, recipe)
    try:
        loggers.parse(out.log)
    except (ValueError, ImportError) as e:
        raise SystemExit(f"error: {e}") from e
    checks = _checks(out, data_kind) + [(not out.cuda_graph or graphs.refusal(out) is None, graphs.refusal(out))]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"error: {msg}")
    try:        # the model's own checks (sizes, pool, dropout, mask ratio) before any data is prepared
        model_cfg = get_config(out.arch, **model_overrides(out))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from e
    if out.block_size is None and hasattr(model_cfg, "block_size"):     # windows of the model's context
        out = dataclasses.replace(out, block_size=model_cfg.block_size)
    for ok, msg in _family_checks(out, model_cfg, data_kind):
        if not ok:
            raise SystemExit(f"error: {msg}")
    if out.warmup_epochs > out.epochs:
        logger.warning("warning: --warmup-epochs %g > --epochs %d: the peak lr is never reached",
                       out.warmup_epochs, out.epochs)
    if out.eval_only and not (out.resume or out.finetune):
        logger.warning("warning: --eval-only without --resume or --finetune evaluates a freshly initialized model")
    return out


def resolution_at(epoch: int, progressive: tuple[int, int, int], patch: int) -> int:
    """Progressive resizing (FFCV's low-res recipe): the training resolution of `epoch` (0-based) for
    --progressive (start, end, end_epoch), linear from start at epoch 0 to end at end_epoch and after,
    rounded down to a multiple of the patch size (start and end are multiples of it: resolve checks)."""
    lo, hi, end = progressive
    if epoch >= end:
        return hi
    res = lo + (hi - lo) * epoch / end
    return max(lo, int(res) // patch * patch)
