"""Training recipes: what train.py does by default for each ``--data`` source (any flag overrides them).

Each recipe is a dict of train.py option names. Sources (docs/DESIGN.md §8):
- imagenet (any train/ val/ folder or .beton directory): the CRATE NeurIPS paper's recipe, Lion, lr
  2.4e-4, weight decay 0.5, batch 2048, 150 epochs, 5 warmup, crop + flip, label smoothing 0.1. (The
  official README's 2e-4 / 0.05 / 512 / 200 and main.py's AdamW 4e-4 / 0.1 / 256 / 90 differ; the paper's
  numbers are the ones it reports.)
- cifar10 / cifar100 / pets / flowers102: the official finetune.py (AdamW, weight decay 0.01, cosine,
  no warmup, RandAugment(2, 14) per image).
- digits: the README's CPU job (8x8 digits upscaled to 32 px, trained at 16 px / patch 4).
- synthetic: random tensors on the device, for throughput runs.

Named recipes (``train.py --recipe NAME``; CRATE-MAE runs take theirs by default), docs/DESIGN.md §8:
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
- mae_digits: the CPU demo of CRATE-MAE on the digits set.
"""
from __future__ import annotations

from crate_fast.data.sources import kind_of

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
    "mae_digits": dict(img_size=16, patch_size=4, epochs=10, batch_size=64, opt="adamw", betas=(0.9, 0.95),
                       lr=1e-3, weight_decay=0.05, wd_exclude=True, warmup_epochs=2, mask_ratio=0.75,
                       label_smoothing=0.0, flip=False, scale=(1.0, 1.0), ratio=(1.0, 1.0), crop_pct=1.0,
                       workers=2),
})

# What no recipe sets: ImageNet-style augmentation (timm's names: RandomResizedCrop scale and aspect
# ratio, evaluation center-crop fraction) and optimizer betas.
DEFAULTS = dict(flip=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), crop_pct=224 / 256, randaugment=False,
                ra_magnitude=14, min_lr=0.0, wd_exclude=False, grad_clip=0.0, mixup=0.0, cutmix=0.0,
                mixup_prob=1.0, mixup_switch_prob=0.5)
BETAS = {"lion": (0.9, 0.99), "adamw": (0.9, 0.999)}


def recipe_for(data: str, name: str | None = None, family: str = "crate") -> tuple[str, dict]:
    """(recipe name, recipe): the named one, else the --data source's (folders and .beton directories are
    ImageNet-style; CRATE-MAE models pretrain with mae_pretrain, on digits with mae_digits). Raises
    ValueError for an unknown name, and what crate_fast.data.sources.kind_of raises for a source that
    does not exist."""
    if name is not None:
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; available: {', '.join(sorted(RECIPES))}")
        return name, RECIPES[name]
    kind = kind_of(data)
    if family == "crate_mae":
        name = "mae_digits" if kind == "digits" else "mae_pretrain"
    else:
        name = kind if kind in RECIPES else "imagenet"
    return name, RECIPES[name]
