"""Train (or finetune, or evaluate) a CRATE model.

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

Every --data source brings a recipe (image size, epochs, optimizer, lr ...; see RECIPES), which any
flag overrides. The resolved config is printed and saved as RUN_DIR/config.json; RUN_DIR also gets
metrics.jsonl (one row per epoch), last.pt and best.pt (written atomically by rank 0).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
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
from crate_fast.data import LoaderOptions, build_loaders
from crate_fast.data.sources import DEFAULT_CACHE, kind_of
from crate_fast.kernels._utils import IMPLS

import crate_fast
from crate_fast.flops import flops_per_image, peak_flops
from crate_fast.optim import Lion, lr_at, param_groups

# torch.compile modes; the two with CUDA graphs replay whole forward / backward graphs, removing the
# per-kernel launch cost that dominates an eager CRATE step on a slow host.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# Recipes (crate_reference.md §3). ImageNet follows the NeurIPS paper (Lion, lr 2.4e-4, wd 0.5,
# batch 2048, 150 epochs, 5 warmup, crop + flip), not the README (2e-4/0.05/512/200) nor main.py's
# defaults (AdamW 4e-4/0.1/256/90): the paper's numbers are the ones it reports.
_FINETUNE = dict(img_size=224, patch_size=16, batch_size=256, opt="adamw", weight_decay=0.01, warmup_epochs=0,
                 label_smoothing=0.0, randaugment=True)
RECIPES = {
    "imagenet": dict(img_size=224, patch_size=16, epochs=150, batch_size=2048, opt="lion", lr=2.4e-4,
                     weight_decay=0.5, warmup_epochs=5, label_smoothing=0.1),
    # 8x8 digits upscaled to 32 px, trained at 16 px / patch 4 (17 tokens). Digits are not
    # flip-invariant, and whole-image crops keep the run bitwise reproducible (FFCV's crops are unseeded).
    "digits": dict(img_size=16, patch_size=4, epochs=12, batch_size=64, opt="adamw", lr=1e-3, weight_decay=0.05,
                   warmup_epochs=1, label_smoothing=0.1, flip=False, crop_scale=(1.0, 1.0),
                   crop_ratio_range=(1.0, 1.0), val_crop=1.0, workers=2),
    "synthetic": dict(img_size=224, patch_size=16, epochs=1, batch_size=256, opt="lion", lr=2.4e-4,
                      weight_decay=0.5, warmup_epochs=0, label_smoothing=0.1),
    # official finetune.py settings per data set (AdamW, wd 0.01, cosine, no warmup, RandAugment(2, 14))
    "cifar10": dict(_FINETUNE, epochs=200, lr=5e-5),
    "cifar100": dict(_FINETUNE, epochs=200, lr=5e-5),
    "pets": dict(_FINETUNE, epochs=400, lr=1e-4),
    "flowers102": dict(_FINETUNE, epochs=400, lr=1e-4),
}


@dataclass
class TrainConfig:
    """Every flag of train.py (None: taken from the data set's recipe)."""

    arch: str = "crate_tiny"
    data: str = "digits"
    out: str = "runs/run"
    impl: str = "auto"                       # reference | torch | triton | auto
    loader: str = "ffcv"                     # ffcv | torchvision
    data_root: str | None = None             # where torchvision data sets live / are downloaded
    cache_dir: str = DEFAULT_CACHE           # converted .beton files
    device: str | None = None                # cpu | cuda (default: cuda when available)
    epochs: int | None = None
    batch_size: int | None = None            # global, across all ranks and accumulation steps
    val_batch_size: int | None = None
    accum_steps: int = 1
    opt: str | None = None                   # lion | adamw
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float | None = None
    betas: tuple[float, float] | None = None
    wd_exclude: bool = False                 # no decay on norms, biases, pos/cls (the official code decays all)
    warmup_epochs: float | None = None
    label_smoothing: float | None = None
    grad_clip: float = 0.0                   # 0: off (the official main.py defines 1.0 but never applies it)
    precision: str | None = None             # bf16 | fp16 | fp32 (default: bf16 on GPU, fp32 on CPU)
    compile: bool = False
    compile_mode: str = "default"            # with --compile: default | reduce-overhead (CUDA graphs) | max-autotune
    img_size: int | None = None
    patch_size: int | None = None
    pool: str = "cls"
    dropout: float = 0.0
    flip: bool | None = None
    crop_scale: tuple[float, float] | None = None
    crop_ratio_range: tuple[float, float] | None = None
    val_crop: float | None = None            # center-crop fraction at evaluation (224/256)
    randaugment: bool | None = None          # RandAugment(2, 14) on the device, per image (finetuning)
    progressive: tuple[int, int, int] | None = None   # (start res, end res, end epoch): FFCV's low-res recipe
    workers: int | None = None
    seed: int = 0
    resume: str | None = None                # RUN_DIR, a .pt file, or "auto" (= --out if it has last.pt)
    finetune: str | None = None              # checkpoint to start from (crate-fast or official), new head
    eval_only: bool = False
    stop_after: int | None = None            # end after this epoch as if preempted (resume later)
    synthetic_steps: int = 50
    max_nonfinite: int = 5                   # consecutive non-finite losses tolerated (skipped) before stopping
    log_every: int = 10
    dist_url: str = "env://"                 # torch.distributed init method


# ---------------------------------------------------------------------------------------------------
# config <-> flags
# ---------------------------------------------------------------------------------------------------
def _parse_pair(kind):
    def parse(s):
        parts = [kind(v) for v in s.replace(",", " ").split()]
        return tuple(parts)
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description="Train CRATE (see the usage at the top of train.py).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        t = f.type if isinstance(f.type, str) else str(f.type)
        if t.startswith("bool"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif "tuple[int, int, int]" in t:
            ap.add_argument(flag, type=_parse_pair(int), default=f.default, metavar="A,B,C")
        elif "tuple[float, float]" in t:
            ap.add_argument(flag, type=_parse_pair(float), default=f.default, metavar="A,B")
        elif t.startswith("int"):
            ap.add_argument(flag, type=int, default=f.default)
        elif t.startswith("float"):
            ap.add_argument(flag, type=float, default=f.default)
        else:
            ap.add_argument(flag, type=str, default=f.default)
    return ap


def recipe_for(data: str) -> tuple[str, dict]:
    kind = kind_of(data)
    name = kind if kind in RECIPES else "imagenet"          # folders and .beton dirs: ImageNet-style data
    return name, RECIPES[name]


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill every None from the recipe and the machine; validate."""
    name, recipe = recipe_for(cfg.data)
    values = {k: (v if v is not None else recipe.get(k)) for k, v in dataclasses.asdict(cfg).items()}
    defaults = dict(flip=True, crop_scale=(0.08, 1.0), crop_ratio_range=(3 / 4, 4 / 3), val_crop=224 / 256,
                    randaugment=False, betas=(0.9, 0.99) if values["opt"] == "lion" else (0.9, 0.999),
                    workers=min(12, os.cpu_count() or 1), device="cuda" if torch.cuda.is_available() else "cpu")
    for k, v in defaults.items():
        if values.get(k) is None:
            values[k] = v
    if values["precision"] is None:
        values["precision"] = "bf16" if values["device"].startswith("cuda") else "fp32"
    out = TrainConfig(**values)
    checks = [
        (out.opt in ("lion", "adamw"), f"--opt must be lion or adamw, got {out.opt!r}"),
        (out.precision in ("bf16", "fp16", "fp32"), f"--precision must be bf16, fp16 or fp32, got {out.precision!r}"),
        (out.loader in ("ffcv", "torchvision"), f"--loader must be ffcv or torchvision, got {out.loader!r}"),
        (out.epochs > 0 and out.batch_size > 0 and out.lr > 0, "epochs, batch size and lr must be positive"),
        (out.accum_steps >= 1, "--accum-steps must be >= 1"),
        (out.compile_mode in COMPILE_MODES, f"--compile-mode must be one of {COMPILE_MODES}, got {out.compile_mode!r}"),
        (out.compile or out.compile_mode == "default", "--compile-mode needs --compile"),
        (out.device in ("cpu", "cuda") or out.device.startswith("cuda:"), f"--device {out.device!r}"),
        (not out.device.startswith("cuda") or torch.cuda.is_available(), "--device cuda but no GPU is visible"),
        (out.arch in crate_fast.list_models(), f"--arch must be one of {crate_fast.list_models()}"),
        (out.impl in IMPLS, f"--impl must be one of {IMPLS}, got {out.impl!r}"),
        (out.impl != "triton" or out.device.startswith("cuda") or os.environ.get("TRITON_INTERPRET") == "1",
         "--impl triton needs a GPU (--device cuda); use --impl torch or auto on the CPU"),
    ]
    for ok, msg in checks:
        if not ok:
            raise SystemExit(f"error: {msg}")
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
# checkpoints
# ---------------------------------------------------------------------------------------------------
def save_atomic(obj, path: str) -> None:
    """Write to a temporary file, fsync, rename: the previous file stays valid until the new is whole."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),  # noqa: NPY002
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])  # noqa: NPY002  (the global state, whoever uses it)
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def find_resume(cfg: TrainConfig) -> str | None:
    if cfg.resume is None:
        return None
    path = cfg.out if cfg.resume == "auto" else cfg.resume
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.exists(path):
        if cfg.resume == "auto":
            return None                      # nothing to resume yet: a fresh start
        raise SystemExit(f"error: --resume {cfg.resume!r}: no checkpoint at {path}")
    return path


def load_finetune(model: crate_fast.CRATE, path: str) -> None:
    """Start from a crate-fast or official checkpoint; a head of another shape is left fresh and the
    position table is interpolated to the model's image size."""
    if not os.path.exists(path):
        raise SystemExit(f"error: --finetune {path!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    sd = obj.get("model", obj) if isinstance(obj, dict) else obj
    ours = model.state_dict()
    if isinstance(sd, dict) and any(k.startswith("blocks.") for k in sd):
        sd = {k: v for k, v in sd.items() if not (k.startswith("head.") and v.shape != ours[k].shape)}
        if sd["pos_embed"].shape != ours["pos_embed"].shape:
            side = math.isqrt(sd["pos_embed"].shape[1] - 1)
            sd["pos_embed"] = crate_fast.layers.resample_pos_embed(sd["pos_embed"], (side, side),
                                                                   model.config.grid_size)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected or any(not k.startswith("head.") for k in missing):
            raise SystemExit(f"error: --finetune {path}: missing {missing}, unexpected {unexpected}")
        return
    num_classes = model.config.num_classes
    try:
        crate_fast.load_official_state_dict(model, obj)
    except RuntimeError:
        crate_fast.load_official_state_dict(model, obj, reset_head=True)   # another class count
    assert model.config.num_classes == num_classes


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
def randaugment_batch(images: torch.Tensor, mean, std) -> torch.Tensor:
    """RandAugment(2, 14) per image, on the device, as the official finetune.py (on uint8 pixels)."""
    from torchvision.transforms import v2

    aug = v2.RandAugment(num_ops=2, magnitude=14)
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    pixels = (images.float() * s + m).round().clamp_(0, 255).to(torch.uint8)
    out = torch.stack([aug(p) for p in pixels]).float()
    return ((out - m) / s).to(images.dtype).contiguous(memory_format=torch.channels_last)


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.is_main = rank == 0
        if cfg.batch_size % (world * cfg.accum_steps):
            raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by world size {world} "
                             f"x --accum-steps {cfg.accum_steps}")
        self.micro_batch = cfg.batch_size // (world * cfg.accum_steps)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
        opts = LoaderOptions(batch_size=self.micro_batch, img_size=cfg.img_size, num_workers=cfg.workers,
                             device=device, dtype=torch.float32, distributed=world > 1, seed=cfg.seed,
                             flip=cfg.flip, scale=cfg.crop_scale, ratio=cfg.crop_ratio_range, crop_ratio=cfg.val_crop,
                             val_batch_size=(cfg.val_batch_size or cfg.batch_size) // world,
                             progressive=cfg.progressive is not None, synthetic_steps=cfg.synthetic_steps)
        self.data = build_loaders(cfg.data, opts, loader=cfg.loader, cache_dir=cfg.cache_dir,
                                  data_root=cfg.data_root)
        if len(self.data.train) == 0:
            raise SystemExit(f"error: the training set has fewer samples than one batch ({self.micro_batch} per rank)")
        torch.manual_seed(cfg.seed)           # same initial weights on every rank
        self.model = crate_fast.create_model(cfg.arch, num_classes=self.data.num_classes, img_size=cfg.img_size,
                                             patch_size=cfg.patch_size, impl=cfg.impl, pool=cfg.pool,
                                             dropout=cfg.dropout).to(device)
        if cfg.finetune:
            load_finetune(self.model, cfg.finetune)
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
        self.epoch, self.step, self.best_top1, self.nonfinite_total = 0, 0, 0.0, 0
        self.flops = flops_per_image(self.model.config, training=True)
        self.peak = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    def _wrap(self, model):
        net = model
        if self.world > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        if self.cfg.compile:
            net = torch.compile(net, mode=self.cfg.compile_mode)
        return net

    # -- checkpoints -------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scaler": self.scaler.state_dict(), "epoch": self.epoch, "step": self.step,
                "best_top1": self.best_top1, "rng": rng_state(), "config": dataclasses.asdict(self.cfg),
                "world_size": self.world, "arch": self.cfg.arch}

    def load(self, path: str) -> None:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch, self.step, self.best_top1 = ckpt["epoch"], ckpt["step"], ckpt["best_top1"]
        set_rng_state(ckpt["rng"])
        if self.is_main:
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step}")

    def save(self, best: bool) -> None:
        if not self.is_main:
            return
        state = self.state()
        save_atomic(state, os.path.join(self.cfg.out, "last.pt"))
        if best:
            save_atomic(state, os.path.join(self.cfg.out, "best.pt"))

    # -- loops ---------------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.precision != "fp32")

    @torch.no_grad()
    def evaluate(self) -> dict:
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

    def train_epoch(self) -> dict:
        from tqdm import tqdm

        cfg, train = self.cfg, self.data.train
        self.net.train()
        train.set_epoch(self.epoch)
        if cfg.progressive is not None:
            lo, hi, end = cfg.progressive
            res = int(round((lo + (hi - lo) * min(1.0, self.epoch / max(1, end))) / 32)) * 32 or lo
            train.set_resolution(res)
        bar = tqdm(total=self.steps_per_epoch, disable=not self.is_main, desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                   dynamic_ncols=True, leave=False)
        loss_sum, seen, bad_in_row, t0 = 0.0, 0, 0, time.perf_counter()
        micro, lr = 0, self.opt.param_groups[0]["lr"]
        for images, labels in train:
            if micro // cfg.accum_steps >= self.steps_per_epoch:
                break
            last_micro = (micro + 1) % cfg.accum_steps == 0
            if cfg.randaugment:
                images = randaugment_batch(images, train.mean.flatten().tolist(), train.std.flatten().tolist())
            if self.graphed:        # a new step: CUDA-graph outputs of the previous one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            sync = last_micro or not hasattr(self.net, "no_sync")
            ctx = self.net.no_sync() if not sync else contextlib.nullcontext()
            with ctx:
                with self.autocast():
                    loss = F.cross_entropy(self.net(images), labels, label_smoothing=cfg.label_smoothing)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            micro += 1
            loss_sum += loss.detach().float() * labels.numel()
            seen += labels.numel()
            if not last_micro:
                continue
            lr = lr_at(self.step, base_lr=cfg.lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                       min_lr=cfg.min_lr)
            for g in self.opt.param_groups:
                g["lr"] = lr
            # A non-finite loss on any rank skips the step on every rank (gradients would poison the
            # weights); too many in a row is a diverged run: stop before any NaN reaches a checkpoint.
            finite = torch.isfinite(loss.detach()).float()
            if dist.is_initialized():
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            if finite.item() == 0:
                self.opt.zero_grad(set_to_none=True)
                bad_in_row += 1
                self.nonfinite_total += 1
                if bad_in_row >= cfg.max_nonfinite:
                    raise FloatingPointError(f"{bad_in_row} non-finite losses in a row at step {self.step}; "
                                             "stopping (lower --lr, or use --precision bf16 / --grad-clip)")
                continue
            bad_in_row = 0
            if cfg.grad_clip > 0:
                self.scaler.unscale_(self.opt)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
            self.opt.zero_grad(set_to_none=True)
            self.step += 1
            bar.update(1)
            if self.is_main and self.step % cfg.log_every == 0:
                dt = time.perf_counter() - t0
                ips = seen * self.world / dt
                post = {"loss": f"{loss.item():.3f}", "img/s": f"{ips:.0f}", "lr": f"{lr:.2e}"}
                if self.peak:
                    post["mfu"] = f"{100 * ips * self.flops / self.peak:.1f}%"
                bar.set_postfix(post)
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        total_loss, total_seen = all_sum([float(loss_sum), seen], self.device)
        return {"train_loss": total_loss / max(total_seen, 1), "img_per_s": total_seen / dt, "lr": lr,
                "epoch_time": dt, "nonfinite_steps": self.nonfinite_total}

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
            best = row["val_top1"] > self.best_top1
            self.best_top1 = max(self.best_top1, row["val_top1"])
            self.save(best)
            if self.is_main:
                from tqdm import tqdm

                with open(os.path.join(cfg.out, "metrics.jsonl"), "a") as f:
                    f.write(json.dumps(row) + "\n")
                tqdm.write(f"epoch {self.epoch}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                           f"val_loss {row['val_loss']:.4f}  top1 {row['val_top1']:.2f}  top5 {row['val_top5']:.2f}  "
                           f"{row['img_per_s']:.0f} img/s  {row['time']:.1f}s")
            if cfg.stop_after is not None and self.epoch >= cfg.stop_after and self.epoch < cfg.epochs:
                if self.is_main:
                    print(f"stopping after epoch {self.epoch} (--stop-after); continue with --resume {cfg.out}")
                break
        return row


def main(argv=None) -> int:
    cfg = resolve(TrainConfig(**vars(build_parser().parse_args(argv))))
    rank, world, _, device = setup_distributed(cfg)
    try:
        if rank == 0:
            os.makedirs(cfg.out, exist_ok=True)
            resolved = {**dataclasses.asdict(cfg), "world_size": world, "recipe": recipe_for(cfg.data)[0]}
            print("config:", json.dumps(resolved, indent=1))
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(resolved, f, indent=1)
        trainer = Trainer(cfg, rank, world, device)
        resume = find_resume(cfg)
        if resume:
            trainer.load(resume)
        if cfg.eval_only:
            metrics = trainer.evaluate()
            if rank == 0:
                print(json.dumps(metrics))
        else:
            final = trainer.fit()
            if rank == 0 and final:
                print(f"done: best top-1 {trainer.best_top1:.2f}%  (run dir {cfg.out})")
        if dist.is_initialized():
            dist.barrier()      # leave together: rank 0 may still be writing its checkpoint
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
