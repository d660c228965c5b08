"""Train (or finetune, or evaluate) a CRATE-family model: CRATE and CRATE-alpha classifiers, CRATE-MAE
masked-autoencoder pretraining.

CPU, the embedded digits data set (the README's main job; about 2 minutes on 2 cores):
    torchrun --standalone --nproc_per_node=1 train.py --arch crate_tiny --data digits --out runs/digits
    python train.py --arch crate_tiny --data digits --out runs/digits          # same, without torchrun
One GPU, ImageNet as train/ val/ ImageFolders (converted to FFCV .beton once, into the cache):
    torchrun --standalone --nproc_per_node=1 train.py --arch crate_base --data /data/imagenet --out runs/b
One node, 8 GPUs, ImageNet already as train.beton / val.beton:
    torchrun --standalone --nproc_per_node=8 train.py --arch crate_base --data /data/betons --out runs/b
Several nodes (run on each; rendezvous at the first node):
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train.py --arch crate_large --data /data/betons --out runs/l --resume auto
Survive preemption / killed workers: add --resume auto (and torchrun --max-restarts=3).
Finetune an official or crate-fast checkpoint on CIFAR-10:
    torchrun --nproc_per_node=1 train.py --arch crate_small --data cifar10 --finetune CRATE_small.pth --out runs/c10
CRATE-alpha, the paper's two stages (named recipes; --recipe picks one whatever the --data source):
    torchrun --nproc_per_node=8 train.py --arch crate_alpha_base --recipe crate_alpha_in21k --data /data/in21k \
        --out runs/a21k
    torchrun --nproc_per_node=8 train.py --arch crate_alpha_base --recipe crate_alpha_in1k_ft --data /data/imagenet \
        --finetune runs/a21k/model.safetensors --out runs/a1k
CRATE-MAE pretraining (FAIR's MAE loop), then a linear probe of the encoder (--probe, scikit-learn):
    torchrun --nproc_per_node=8 train.py --arch mae_crate_base --data /data/imagenet --out runs/mae --norm-pix-loss
    python train.py --arch mae_crate_tiny --data digits --out runs/mae_digits --probe    # the CPU demo

Every --data source brings a recipe (image size, epochs, optimizer, lr ...; crate_fast/recipes.py), or
--recipe names one (crate_alpha_in21k, crate_alpha_in1k_ft, mae_pretrain); any flag overrides them. The
resolved config is printed and saved as RUN_DIR/config.json; RUN_DIR also gets metrics.jsonl (one row per
epoch), last.pt and best.pt (written atomically by rank 0; crate_fast/runs.py) and model.safetensors (the
best model's weights alone, for crate_fast.load_weights or any framework).
Files given to --resume and --finetune are read with torch.load(weights_only=True): nothing in them runs
(--trust-checkpoint opts out for a file you trust). Progress is a bar on a terminal, else a log line
every --log-every steps.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import crate_fast
from crate_fast.checkpoint import UnsafeCheckpointError
from crate_fast.data import LoaderOptions, build_loaders
from crate_fast.data.sources import DEFAULT_CACHE, kind_of
from crate_fast.flops import flops_per_image, peak_flops
from crate_fast.optim import Lion, lr_at, param_groups
from crate_fast.progress import Progress
from crate_fast.recipes import BETAS, DEFAULTS, recipe_for
from crate_fast.runs import find_resume, load_run_checkpoint, rng_state, save_atomic, set_rng_state

# torch.compile modes; the two with CUDA graphs replay whole forward / backward graphs, removing the
# per-kernel launch cost that dominates an eager CRATE step on a slow host.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    """Every flag of train.py (None: taken from the data set's recipe, crate_fast/recipes.py)."""

    arch: str = "crate_tiny"                 # a preset of any family (crate_fast.list_models())
    data: str = "digits"                     # digits | synthetic | cifar10 | ... | a folder of train/ val/ or .betons
    recipe: str | None = None                # a named recipe (crate_fast/recipes.py) instead of --data's own
    out: str = "runs/run"                    # the run directory (config, metrics, checkpoints)
    impl: str = "auto"                       # one of crate_fast.IMPLS
    loader: str = "ffcv"                     # ffcv | torchvision
    data_root: str | None = None             # where torchvision data sets live / are downloaded
    cache_dir: str = DEFAULT_CACHE           # converted .beton files
    device: str | None = None                # cpu | cuda (None: cuda when available)
    epochs: int | None = None                # training epochs
    batch_size: int | None = None            # global, across all ranks and accumulation steps
    val_batch_size: int | None = None        # global evaluation batch (None: --batch-size)
    accum_steps: int = 1                     # gradient accumulation: micro-batches per optimizer step
    opt: str | None = None                   # lion | adamw
    lr: float | None = None                  # peak learning rate (after warmup)
    blr: float | None = None                 # base lr per 256 images: lr = blr x batch / 256 when --lr is not set
    min_lr: float | None = None              # the cosine schedule's floor
    weight_decay: float | None = None        # decoupled weight decay
    betas: tuple[float, float] | None = None   # optimizer betas (None: the optimizer's usual ones)
    wd_exclude: bool | None = None           # no decay on 1-D params, model.no_weight_decay() (CRATE decays all)
    warmup_epochs: float | None = None       # linear warmup, per step
    label_smoothing: float | None = None     # cross-entropy label smoothing
    mixup: float | None = None               # mixup alpha (timm's Mixup; 0: off)
    cutmix: float | None = None              # cutmix alpha (0: off)
    mixup_prob: float | None = None          # probability of mixing a batch at all
    mixup_switch_prob: float | None = None   # probability of cutmix instead of mixup when both are on
    grad_clip: float | None = None           # 0: off (the official CRATE main.py defines 1.0 but never applies it)
    precision: str | None = None             # bf16 | fp16 | fp32 (None: bf16 on GPU, fp32 on CPU)
    compile: bool = False                    # torch.compile the model
    compile_mode: str = "default"            # with --compile: default | reduce-overhead (CUDA graphs) | max-autotune
    img_size: int | None = None              # training resolution (px)
    patch_size: int | None = None            # patch size (None: the recipe's, else the preset's)
    pool: str = "cls"                        # classifier pooling: cls | mean
    dropout: float = 0.0                     # attention and output-projection dropout
    drop_path: float | None = None           # stochastic depth of the last block, linear from 0 (CRATE-alpha)
    mask_ratio: float | None = None          # CRATE-MAE: fraction of patches masked
    norm_pix_loss: bool | None = None        # CRATE-MAE: per-patch standardized pixel targets
    grad_checkpointing: bool = False         # recompute each block in the backward: less activation memory
    flip: bool | None = None                 # random horizontal flips in training
    scale: tuple[float, float] | None = None      # RandomResizedCrop area range (timm's name)
    ratio: tuple[float, float] | None = None      # RandomResizedCrop aspect-ratio range (timm's name)
    crop_pct: float | None = None            # center-crop fraction at evaluation (224/256; timm's name)
    randaugment: bool | None = None          # RandAugment(2, --ra-magnitude) per image on uint8 pixels (finetuning)
    ra_magnitude: int | None = None          # 14: the official CRATE finetune.py; 9: CRATE-alpha's
    progressive: tuple[int, int, int] | None = None   # (start res, end res, end epoch): FFCV's low-res recipe
    workers: int | None = None               # data-loading worker threads
    seed: int = 0                            # initial weights, data order, masks
    resume: str | None = None                # RUN_DIR, a .pt file, or "auto" (= --out if it has last.pt)
    finetune: str | None = None              # weights to start from (crate-fast or official), new head
    trust_checkpoint: bool = False           # allow --resume/--finetune files that need code execution to load
    eval_only: bool = False                  # evaluate (--resume / --finetune weights) and exit
    probe: bool = False                      # CRATE-MAE: linear probe of the encoder after training (and at init)
    stop_after: int | None = None            # end after this epoch as if preempted (resume later)
    synthetic_steps: int = 50                # steps per epoch of --data synthetic
    max_nonfinite: int = 5                   # consecutive non-finite steps tolerated (skipped) before stopping
    log_every: int = 10                      # steps between progress updates (log lines when not on a terminal)
    dist_url: str = "env://"                 # torch.distributed init method


# Earlier flag names, still accepted.
ALIASES = {"scale": ["--crop-scale"], "ratio": ["--crop-ratio-range"], "crop_pct": ["--val-crop"]}


# ---------------------------------------------------------------------------------------------------
# config <-> flags
# ---------------------------------------------------------------------------------------------------
def _parse_tuple(kind):
    def parse(s):
        return tuple(kind(v) for v in s.replace(",", " ").split())
    return parse


def _field_help() -> dict[str, str]:
    """Each TrainConfig field's trailing comment (its one-line documentation), for --help. Read from this
    file's text, not inspect.getsource: its ast.parse fails at random on CPython 3.11.7 ("AST constructor
    recursion depth mismatch", a CPython bug), which broke a test run."""
    import re

    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    body = source[source.index("class TrainConfig:"):]
    body = body[:body.index("\n\n\n")]
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s+(\w+): [^=\n]+=[^#\n]*#(.*)$", body, re.M)}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train a CRATE-family model (see the usage at the top of train.py). "
                                 "A default of None comes from the --data source's recipe or --recipe.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    helps = _field_help()
    for f in dataclasses.fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-")] + ALIASES.get(f.name, [])
        t = f.type if isinstance(f.type, str) else str(f.type)
        kw = dict(default=f.default, help=helps.get(f.name, " "))
        if t.startswith("bool"):
            ap.add_argument(*flags, action=argparse.BooleanOptionalAction, **kw)
        elif "tuple[int, int, int]" in t:
            ap.add_argument(*flags, type=_parse_tuple(int), metavar="A,B,C", **kw)
        elif "tuple[float, float]" in t:
            ap.add_argument(*flags, type=_parse_tuple(float), metavar="A,B", **kw)
        elif t.startswith("int"):
            ap.add_argument(*flags, type=int, **kw)
        elif t.startswith("float"):
            ap.add_argument(*flags, type=float, **kw)
        else:
            ap.add_argument(*flags, type=str, **kw)
    return ap


# TrainConfig fields that are model config fields: passed to the --arch family's config when it has them.
MODEL_FIELDS = ("img_size", "patch_size", "impl", "pool", "dropout", "drop_path", "mask_ratio", "norm_pix_loss")


def _same(value):
    """A config value as compared across runs (a JSON round trip turns tuples into lists)."""
    return list(value) if isinstance(value, tuple) else value


def family_of(cfg: TrainConfig) -> str:
    return crate_fast.registry.family_of(cfg.arch).name


def model_overrides(cfg: TrainConfig, num_classes: int | None = None) -> dict:
    """The --arch model's config fields set by flags (or the recipe). A flag the family does not have is
    an error unless it is left at its default. Raises SystemExit("error: ...")."""
    fam = crate_fast.registry.family_of(cfg.arch)
    fields = fam.config_class.__dataclass_fields__
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    out = {"num_classes": num_classes} if num_classes is not None and "num_classes" in fields else {}
    for name in MODEL_FIELDS:
        value = getattr(cfg, name)
        if name in fields and value is not None:
            out[name] = value
        elif name not in fields and value is not None and value != defaults[name]:
            raise SystemExit(f"error: --{name.replace('_', '-')} does not apply to {fam.title} models ({cfg.arch})")
    return out


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every None from the recipe and the machine; validate. Raises SystemExit("error: ...")."""
    if cfg.arch not in crate_fast.list_models():
        raise SystemExit(f"error: --arch must be one of {crate_fast.list_models()}, got {cfg.arch!r}")
    try:
        data_kind = kind_of(cfg.data)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from e
    try:
        _, recipe = recipe_for(cfg.data, cfg.recipe, family_of(cfg))
    except ValueError as e:
        raise SystemExit(f"error: --recipe: {e}") from e
    values = {k: (v if v is not None else recipe.get(k, DEFAULTS.get(k))) for k, v in dataclasses.asdict(cfg).items()}
    if cfg.lr is None and values["blr"] is not None:          # FAIR's rule: lr = blr x effective batch / 256
        values["lr"] = values["blr"] * values["batch_size"] / 256
    if values["betas"] is None:
        values["betas"] = BETAS.get(values["opt"])
    values["workers"] = values["workers"] or min(12, os.cpu_count() or 1)
    values["device"] = values["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    values["precision"] = values["precision"] or ("bf16" if values["device"].startswith("cuda") else "fp32")
    out = TrainConfig(**values)
    checks = [
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
        (out.impl in crate_fast.IMPLS, f"--impl must be one of {crate_fast.IMPLS}, got {out.impl!r}"),
        (out.impl != "triton" or out.device.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1",
         "--impl triton needs a GPU (--device cuda); use --impl torch or auto on the CPU"),
    ]
    pair = lambda v, lo, hi: v is not None and len(v) == 2 and lo <= v[0] <= v[1] <= hi  # noqa: E731
    checks += [
        (pair(out.scale, 1e-6, 1.0), f"--scale must be two numbers 0 < min <= max <= 1, got {out.scale}"),
        (pair(out.ratio, 1e-6, 1e6), f"--ratio must be two numbers 0 < min <= max, got {out.ratio}"),
        (0 < out.crop_pct <= 1, f"--crop-pct must be in (0, 1], got {out.crop_pct}"),
        (out.progressive is None or (len(out.progressive) == 3 and 0 < out.progressive[0] <= out.progressive[1]),
         f"--progressive must be START_RES,END_RES,END_EPOCH with START <= END, got {out.progressive}"),
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
    mae = family_of(out) == "crate_mae"
    mixing = out.mixup > 0 or out.cutmix > 0
    checks += [
        (not (mae and mixing), "--mixup/--cutmix mix labels; CRATE-MAE pretraining has none"),
        (not out.probe or mae, "--probe (a linear probe of the encoder) is for CRATE-MAE runs"),
        (not mixing or importlib.util.find_spec("timm") is not None, "--mixup/--cutmix need timm (pip install timm)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"error: {msg}")
    try:        # the model's own checks (sizes, pool, dropout, mask ratio) before any data is prepared
        crate_fast.get_config(out.arch, **model_overrides(out))
    except (ValueError, TypeError) as e:
        raise SystemExit(f"error: {e}") from e
    if out.warmup_epochs > out.epochs:
        print(f"warning: --warmup-epochs {out.warmup_epochs:g} > --epochs {out.epochs}: the peak lr is never reached",
              file=sys.stderr)
    if out.eval_only and not (out.resume or out.finetune):
        print("warning: --eval-only without --resume or --finetune evaluates a freshly initialized model",
              file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------------
# distributed
# ---------------------------------------------------------------------------------------------------
def setup_distributed(cfg: TrainConfig) -> tuple[int, int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device.startswith("cuda"):
        device = torch.device("cuda", local if cfg.device == "cuda" else torch.device(cfg.device).index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=cfg.dist_url)
    return rank, world, local, device


def all_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.is_main = rank == 0
        if cfg.batch_size % (world * cfg.accum_steps):
            raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by world size {world} "
                             f"x --accum-steps {cfg.accum_steps}")
        self.micro_batch = cfg.batch_size // (world * cfg.accum_steps)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
        self.data = build_loaders(cfg.data, self.loader_options(), loader=cfg.loader, cache_dir=cfg.cache_dir,
                                  data_root=cfg.data_root)
        if len(self.data.train) == 0:
            raise SystemExit(f"error: the training set has fewer samples than one batch ({self.micro_batch} per rank)")
        self.mae = family_of(cfg) == "crate_mae"      # masked-autoencoder pretraining, no labels
        # numpy and random drive timm's Mixup/CutMix draws: seeded, so one --seed gives one run
        np.random.seed(cfg.seed + rank)  # noqa: NPY002  (timm draws from numpy's global generator)
        random.seed(cfg.seed + rank)
        torch.manual_seed(cfg.seed)           # same initial weights on every rank
        self.model = crate_fast.create_model(cfg.arch, **model_overrides(cfg, self.data.num_classes)).to(device)
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:   # timm's Mixup/CutMix on the normalized batch; soft targets
            from timm.data import Mixup

            if self.micro_batch % 2:
                raise SystemExit(f"error: mixup/cutmix pair images in a batch; the per-rank batch {self.micro_batch} "
                                 "must be even")
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                               num_classes=self.data.num_classes)
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        if cfg.finetune:
            self._load_or_exit("--finetune", cfg.finetune, lambda: crate_fast.load_weights(
                self.model, cfg.finetune, reset_head="auto", trusted=cfg.trust_checkpoint))
        self.steps_per_epoch = len(self.data.train) // cfg.accum_steps
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        groups = param_groups(self.model, cfg.weight_decay, cfg.wd_exclude)
        if cfg.opt == "lion":
            self.opt = Lion(groups, lr=cfg.lr, betas=cfg.betas)
        else:
            self.opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
        self.net = self._wrap(self.model)
        self.graphed = cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")
        # best_score: val top-1 for classifiers, minus the val loss for MAE pretraining (higher is better)
        self.epoch, self.step, self.best_score, self.nonfinite_total = 0, 0, -math.inf, 0
        self.flops = flops_per_image(self.model.config, training=True)
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def loader_options(self) -> LoaderOptions:
        cfg, world = self.cfg, self.world
        augment = None
        if cfg.randaugment:    # per image on uint8 pixels, as the official finetune.py (before normalizing)
            from crate_fast.data.augment import RandAugment

            augment = RandAugment(num_ops=2, magnitude=cfg.ra_magnitude)
        return LoaderOptions(batch_size=self.micro_batch, img_size=cfg.img_size, num_workers=cfg.workers,
                             device=self.device, dtype=torch.float32, distributed=world > 1, seed=cfg.seed,
                             flip=cfg.flip, scale=cfg.scale, ratio=cfg.ratio, crop_pct=cfg.crop_pct,
                             val_batch_size=(cfg.val_batch_size or cfg.batch_size) // world,
                             progressive=cfg.progressive is not None, synthetic_steps=cfg.synthetic_steps,
                             batch_transform=augment)

    def _wrap(self, model):
        net = model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        if self.cfg.compile:
            net = torch.compile(net, mode=self.cfg.compile_mode)
        return net

    @staticmethod
    def _load_or_exit(flag: str, path: str, load):
        try:
            return load()
        except (FileNotFoundError, ValueError, TypeError, RuntimeError, UnsafeCheckpointError) as e:
            hint = " (or pass --trust-checkpoint)" if isinstance(e, UnsafeCheckpointError) and \
                "--trust-checkpoint" not in str(e) else ""
            raise SystemExit(f"error: {flag} {path}: {e}{hint}") from e

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict:
        """A run checkpoint: tensors and plain containers only (crate_fast.runs)."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "best_score": self.best_score, "nonfinite_steps": self.nonfinite_total, "rng": rng_state(),
                "config": dataclasses.asdict(self.cfg), "world_size": self.world, "arch": self.cfg.arch}

    # What a resumed run must share with the run that wrote the checkpoint: the model and the optimizer's
    # state layout (lr, epochs and the like may change on purpose).
    RESUME_FIELDS = ("arch", *(f for f in MODEL_FIELDS if f != "impl"), "opt", "wd_exclude")

    def load(self, path: str) -> None:
        trusted = self.cfg.trust_checkpoint
        ckpt = self._load_or_exit("--resume", path, lambda: load_run_checkpoint(path, trusted=trusted))
        saved = ckpt.get("config", {})
        differ = [f"--{k.replace('_', '-')} {saved[k]!r} there, {getattr(self.cfg, k)!r} now"
                  for k in self.RESUME_FIELDS if k in saved and _same(saved[k]) != _same(getattr(self.cfg, k))]
        if differ:
            raise SystemExit(f"error: --resume {path}: this run's settings differ from the checkpoint's "
                             f"({'; '.join(differ)}). Resume with the run's own flags (its config.json has them), "
                             "or start a new --out with --finetune to begin from its weights.")
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        self.best_score = ckpt["best_score"] if "best_score" in ckpt else ckpt["best_top1"]   # older runs
        self.nonfinite_total = ckpt.get("nonfinite_steps", 0)
        set_rng_state(ckpt["rng"])
        if self.is_main:
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step}", flush=True)

    def save(self, best: bool) -> None:
        if not self.is_main:
            return
        state = self.state()
        save_atomic(state, os.path.join(self.cfg.out, "last.pt"))
        if best:
            save_atomic(state, os.path.join(self.cfg.out, "best.pt"))
            crate_fast.save_weights(self.model, os.path.join(self.cfg.out, "model.safetensors"))   # best weights

    # -- loops ---------------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.precision != "fp32")

    def loss_of(self, images: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The training objective of one micro-batch: MAE reconstruction loss (noise: the masking noise,
        None to draw it), else cross-entropy (on timm's mixed soft targets when mixup/cutmix is on)."""
        if self.mae:
            return self.net(images, noise=noise)[0]
        if self.mixup is not None and self.net.training:
            images, soft = self.mixup(images, labels)
            return torch.sum(-soft * F.log_softmax(self.net(images).float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(self.net(images), labels, label_smoothing=self.cfg.label_smoothing)

    @torch.no_grad()
    def evaluate(self) -> dict:
        return self.evaluate_mae() if self.mae else self.evaluate_classifier()

    @torch.no_grad()
    def evaluate_mae(self) -> dict:
        """Reconstruction loss on the validation set, every epoch under the same masks (noise drawn from a
        generator seeded with --seed and the batch number), so epochs compare."""
        self.net.eval()
        loss_sum = n = 0.0
        patches = self.model.config.num_patches
        for i, (images, _) in enumerate(self.data.val):
            if self.graphed:
                torch.compiler.cudagraph_mark_step_begin()
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + i * self.world + self.rank)
            noise = torch.rand(images.shape[0], patches, generator=gen).to(self.device)
            with self.autocast():
                loss = self.loss_of(images, None, noise)
            loss_sum += loss.float().item() * images.shape[0]
            n += images.shape[0]
        loss_sum, n = all_sum([loss_sum, n], self.device)
        return {"val_loss": loss_sum / max(n, 1), "val_samples": int(n)}

    @torch.no_grad()
    def evaluate_classifier(self) -> dict:
        self.net.eval()
        loss_sum = top1 = top5 = n = 0.0
        for images, labels in self.data.val:
            if self.graphed:
                torch.compiler.cudagraph_mark_step_begin()
            with self.autocast():
                logits = self.net(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += (top[:, 0] == labels).sum().item()
            top5 += (top == labels[:, None]).any(1).sum().item()
            n += labels.numel()
        loss_sum, top1, top5, n = all_sum([loss_sum, top1, top5, n], self.device)
        return {"val_loss": loss_sum / max(n, 1), "val_top1": 100 * top1 / max(n, 1),
                "val_top5": 100 * top5 / max(n, 1), "val_samples": int(n)}

    def optimizer_step(self, finite: torch.Tensor, lr: float) -> bool:
        """Apply the accumulated gradients, unless any micro-batch loss of this step was non-finite on
        any rank: then the step is skipped on every rank (its gradients would poison the weights), and
        max_nonfinite skipped steps in a row stop the run before any NaN reaches a checkpoint.
        Returns whether the step was taken."""
        if dist.is_initialized():
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() == 0:
            self.opt.zero_grad(set_to_none=True)
            self.bad_in_row += 1
            self.nonfinite_total += 1
            if self.bad_in_row >= self.cfg.max_nonfinite:
                raise FloatingPointError(f"{self.bad_in_row} non-finite losses in a row at step {self.step}; "
                                         "stopping (lower --lr, or use --precision bf16 / --grad-clip)")
            return False
        self.bad_in_row = 0
        for g in self.opt.param_groups:
            g["lr"] = lr
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        return True

    def train_epoch(self) -> dict:
        cfg, train = self.cfg, self.data.train
        self.net.train()
        train.set_epoch(self.epoch)
        if cfg.progressive is not None:
            lo, hi, end = cfg.progressive
            res = int(round((lo + (hi - lo) * min(1.0, self.epoch / max(1, end))) / 32)) * 32 or lo
            train.set_resolution(res)
        progress = Progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}", every=cfg.log_every,
                            enabled=self.is_main)
        # loss sums of the steps taken (a skipped step's losses are dropped), images seen for img/s
        loss_sum, loss_n, seen, t0 = 0.0, 0, 0, time.perf_counter()
        micro, lr, self.bad_in_row = 0, self.opt.param_groups[0]["lr"], 0
        step_loss, finite = 0.0, torch.ones((), device=self.device)
        for images, labels in train:
            if micro // cfg.accum_steps >= self.steps_per_epoch:
                break
            last_micro = (micro + 1) % cfg.accum_steps == 0
            if self.graphed:        # a new step: CUDA-graph outputs of the previous one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            sync = last_micro or not hasattr(self.net, "no_sync")
            with self.net.no_sync() if not sync else contextlib.nullcontext():
                with self.autocast():
                    loss = self.loss_of(images, labels)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            micro += 1
            loss = loss.detach()
            finite = finite * torch.isfinite(loss)        # every micro-batch counts, not only the last
            step_loss = step_loss + loss.float() * images.shape[0]
            seen += images.shape[0]
            if not last_micro:
                continue
            lr = lr_at(self.step, base_lr=cfg.lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                       min_lr=cfg.min_lr)
            if self.optimizer_step(finite, lr):
                loss_sum, loss_n = loss_sum + step_loss, loss_n + images.shape[0] * cfg.accum_steps
            step_loss, finite = 0.0, torch.ones((), device=self.device)
            post = {}
            if self.is_main and self.step % cfg.log_every == 0:
                ips = seen * self.world / (time.perf_counter() - t0)
                post = {"loss": f"{loss.item():.3f}", "img/s": f"{ips:.0f}", "lr": f"{lr:.2e}"}
                if self.peak:
                    post["mfu"] = f"{100 * ips * self.flops / self.peak:.1f}%"
            progress.update(1, **post)
        progress.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        total_loss, total_n, total_seen = all_sum([float(loss_sum), loss_n, seen], self.device)
        return {"train_loss": total_loss / total_n if total_n else float("nan"), "img_per_s": total_seen / dt,
                "lr": lr, "epoch_time": dt, "nonfinite_steps": self.nonfinite_total}

    def probe(self) -> dict:
        """A linear probe (crate_fast.probe: scikit-learn's logistic regression on frozen CLS features) of the
        trained encoder and, for comparison, of the same encoder at initialization (--seed's weights).
        Every rank extracts its shard of the features; rank 0 fits on all of them and writes
        RUN_DIR/probe.json."""
        from crate_fast.probe import linear_probe

        torch.manual_seed(self.cfg.seed)             # the initial weights this run started from
        init = crate_fast.create_model(self.cfg.arch, **model_overrides(self.cfg)).to(self.device)
        rows = {}
        for name, model in (("pretrained", self.model), ("init", init)):
            rows[name] = linear_probe(model, self.data.train, self.data.val, gather=self.gather)
        if self.is_main:
            for name, row in rows.items():
                print(f"linear probe ({name} encoder): train top-1 {row['train_top1']:.2f}  "
                      f"val top-1 {row['val_top1']:.2f}", flush=True)
            with open(os.path.join(self.cfg.out, "probe.json"), "w") as f:
                json.dump(rows, f, indent=1)
        return rows

    def gather(self, array):
        """Every rank's numpy array, concatenated along axis 0 (rank order); the array itself alone."""
        if not dist.is_initialized():
            return array
        parts = [None] * self.world
        dist.all_gather_object(parts, array)
        return np.concatenate(parts, axis=0)

    def fit(self) -> dict:
        cfg = self.cfg
        row = {}
        while self.epoch < cfg.epochs:
            t = time.time()
            row = self.train_epoch()
            self.epoch += 1
            row.update(self.evaluate())
            row.update(epoch=self.epoch, step=self.step, time=time.time() - t)
            if self.peak:
                row["mfu"] = row["img_per_s"] * self.flops / self.peak
            score = -row["val_loss"] if self.mae else row["val_top1"]
            best = score > self.best_score
            self.best_score = max(self.best_score, score)
            self.save(best)
            if self.is_main:
                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                acc = "" if self.mae else f"top1 {row['val_top1']:.2f}  top5 {row['val_top5']:.2f}  "
                print(f"epoch {self.epoch}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                      f"val_loss {row['val_loss']:.4f}  {acc}{row['img_per_s']:.0f} img/s  {row['time']:.1f}s",
                      flush=True)
            if cfg.stop_after is not None and self.epoch >= cfg.stop_after and self.epoch < cfg.epochs:
                if self.is_main:
                    print(f"stopping after epoch {self.epoch} (--stop-after); continue with --resume {cfg.out}")
                break
        return row


def main(argv=None) -> int:
    cfg = resolve(TrainConfig(**vars(build_parser().parse_args(argv))))
    try:
        resume = find_resume(cfg.resume, cfg.out)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from e
    rank, world, _, device = setup_distributed(cfg)
    try:
        if rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            resolved = {**dataclasses.asdict(cfg), "world_size": world,
                        "recipe": recipe_for(cfg.data, cfg.recipe, family_of(cfg))[0]}
            print("config:", json.dumps(resolved, indent=1))
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(resolved, f, indent=1)
        trainer = Trainer(cfg, rank, world, device)
        if resume:
            trainer.load(resume)
        if cfg.eval_only:
            metrics = trainer.evaluate()
            if rank == 0:
                print(json.dumps(metrics))
        else:
            final = trainer.fit()
            if rank == 0 and final:
                best = f"val loss {-trainer.best_score:.4f}" if trainer.mae else f"top-1 {trainer.best_score:.2f}%"
                print(f"done: best {best}  (run dir {cfg.out})")
        if cfg.probe:
            trainer.probe()
        if dist.is_initialized():
            dist.barrier()      # leave together: rank 0 may still be writing its checkpoint
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
