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

# What no recipe sets: ImageNet-style augmentation (timm's names: RandomResizedCrop scale and aspect
# ratio, evaluation center-crop fraction) and optimizer betas.
DEFAULTS = dict(flip=True, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), crop_pct=224 / 256, randaugment=False)
BETAS = {"lion": (0.9, 0.99), "adamw": (0.9, 0.999)}


def recipe_for(data: str) -> tuple[str, dict]:
    """(recipe name, recipe) for a --data value; folders and .beton directories are ImageNet-style.
    Raises what crate_fast.data.sources.kind_of raises for a source that does not exist."""
    kind = kind_of(data)
    name = kind if kind in RECIPES else "imagenet"
    return name, RECIPES[name]
