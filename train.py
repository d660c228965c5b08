"""Train (or finetune, or evaluate) a CRATE-family model: CRATE and CRATE-alpha classifiers, CRATE-MAE
masked-autoencoder pretraining, CRATE-GPT language models.

CPU, the embedded digits data set (the README's main job; about 2 minutes on 2 cores):
    torchrun --standalone --nproc_per_node=1 train.py --arch crate_tiny --data digits --out runs/digits
    python train.py --arch crate_tiny --data digits --out runs/digits          # same, without torchrun
One GPU, ImageNet as train/ val/ ImageFolders (converted to FFCV .beton once, into the cache):
    torchrun --standalone --nproc_per_node=1 train.py --arch crate_base --data /data/imagenet --out runs/b
One node, 8 GPUs, ImageNet already as train.beton / val.beton:
    torchrun --standalone --nproc_per_node=8 train.py --arch crate_base --data /data/betons --out runs/b
Several nodes (run on each; rendezvous at the first node). --out must be on a file system every node
shares: rank 0 (which may be on any node, and another one after a restart) writes the checkpoints, and
every rank resumes from the one file rank 0 chose; a run stops at once, naming the ranks and hosts,
when the nodes do not see one --out or disagree on the state they resumed:
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        train.py --arch crate_large --data /data/betons --out /shared/runs/l --resume auto
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
    python train.py --arch mae_crate_digits --data digits --out runs/mae_digits --probe  # the CPU demo
CRATE-GPT on the embedded corpus (the standard library's docstrings as bytes; minutes on 2 CPU cores, ends
with a text sample), or on nanoGPT's train.bin / val.bin (crate-lm's OpenWebText recipe):
    python train.py --arch crate_gpt_tiny --data pydocs --out runs/gpt_pydocs
    torchrun --nproc_per_node=8 train.py --arch crate_gpt_base --data /data/owt --out runs/gpt --compile

Every --data source brings a recipe (image size, epochs, optimizer, lr ...; crate_fast/training/recipes.py), or
--recipe names one (crate_alpha_in21k, crate_alpha_in1k_ft, mae_pretrain, crate_gpt_owt); flags override them. The
resolved config is printed and saved as RUN_DIR/config.json; RUN_DIR also gets metrics.jsonl (one row per
epoch), last.pt and best.pt (written atomically by rank 0; crate_fast/training/runs.py) and
model.safetensors (the best model's weights alone, for crate_fast.load_model / load_weights or any framework).
Files given to --resume and --finetune are read with torch.load(weights_only=True): nothing in them runs
(--trust-checkpoint opts out for a file you trust). Progress is a bar on a terminal, else a log line
every --log-every steps.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

import crate_fast
from crate_fast.data import LoaderOptions, RandAugment, build_loaders
from crate_fast.data.sources import DEFAULT_CACHE
from crate_fast.flops import flops_per_sample, peak_flops
from crate_fast.io import save_atomic
from crate_fast.progress import Progress
from crate_fast.registry import family_of
from crate_fast.training import dist, loggers, runs
from crate_fast.training.flags import parser_for
from crate_fast.training.graphs import GraphedStep
from crate_fast.training.loggers import RunLog
from crate_fast.training.objectives import Run, objective_for
from crate_fast.training.optim import build_optimizer, lr_at, set_lr
from crate_fast.training.recipes import model_flags, model_overrides, recipe_for, resolution_at, resolve
from crate_fast.training.runs import NonfiniteGuard


@dataclass
class TrainConfig:
    """Every flag of train.py (None: taken from the data set's recipe, crate_fast/training/recipes.py)."""

    arch: str = "crate_tiny"                 # a preset of any family (crate_fast.list_models())
    data: str = "digits"                     # digits | synthetic | cifar10 | ... | a folder of train/ val/ or .betons
    recipe: str | None = None                # a named recipe (crate_fast/training/recipes.py) instead of --data's own
    out: str = "runs/run"                    # the run directory; several nodes: on a file system all share
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
    compile: bool = False                    # torch.compile each block (regional, before DDP)
    compile_mode: str = "default"            # with --compile: default | reduce-overhead (CUDA graphs) | max-autotune
    cuda_graph: bool = False                 # replay forward + backward as one captured CUDA graph (GPU)
    img_size: int | None = None              # training resolution (px)
    patch_size: int | None = None            # patch size (None: the recipe's, else the preset's)
    pool: str = "cls"                        # classifier pooling: cls | mean
    dropout: float = 0.0                     # attention and output-projection dropout
    drop_path: float | None = None           # stochastic depth of the last block, linear from 0 (CRATE-alpha)
    mask_ratio: float | None = None          # CRATE-MAE: fraction of patches masked
    norm_pix_loss: bool | None = None        # CRATE-MAE: per-patch standardized pixel targets
    grad_checkpointing: bool = False         # recompute each block in the backward: less activation memory
    recompute: bool | None = None            # CRATE-GPT: the lean backward (recomputes P and the codes; 0.5x memory)
    flip: bool | None = None                 # random horizontal flips in training
    scale: tuple[float, float] | None = None      # RandomResizedCrop area range (timm's name)
    ratio: tuple[float, float] | None = None      # RandomResizedCrop aspect-ratio range (timm's name)
    crop_pct: float | None = None            # center-crop fraction at evaluation (224/256; timm's name)
    randaugment: bool | None = None          # RandAugment(2, --ra-magnitude) per image on uint8 pixels (finetuning)
    ra_magnitude: int | None = None          # 14: the official CRATE finetune.py; 9: CRATE-alpha's
    progressive: tuple[int, int, int] | None = None   # (start res, end res, end epoch): FFCV's low-res recipe
    workers: int | None = None               # data-loading threads (None: the node's cores / its ranks)
    seed: int = 0                            # initial weights, data order, masks
    resume: str | None = None                # RUN_DIR, a .pt file, or "auto" (= --out if it has last.pt)
    finetune: str | None = None              # weights to start from (crate-fast or official), new head
    trust_checkpoint: bool = False           # allow --resume/--finetune files that need code execution to load
    eval_only: bool = False                  # evaluate (--resume / --finetune weights) and exit
    probe: bool = False                      # CRATE-MAE: linear probes (CLS, mean) of the encoder, trained and at init
    stop_after: int | None = None            # end after this epoch as if preempted (resume later)
    synthetic_steps: int = 50                # steps per epoch of --data synthetic
    block_size: int | None = None            # language models: context (tokens per window; the model's wpe rows)
    epoch_steps: int | None = None           # token data: optimizer steps per epoch (random windows)
    val_steps: int | None = None             # token data: batches per validation
    max_nonfinite: int = 5                   # consecutive non-finite steps tolerated (skipped) before stopping
    log_every: int = 10                      # steps between progress updates (log lines when not on a terminal)
    log: str | None = None                   # also log to: tensorboard, wandb or both (comma-separated)
    dist_url: str = "env://"                 # torch.distributed init method


# Earlier flag names, still accepted.
ALIASES = {"scale": ["--crop-scale"], "ratio": ["--crop-ratio-range"], "crop_pct": ["--val-crop"]}


def build_parser():
    return parser_for(TrainConfig, "Train a CRATE-family model (see the usage at the top of train.py). A default of "
                      "None comes from the --data source's recipe or --recipe.", ALIASES)


def loader_options(cfg: TrainConfig, micro_batch: int, ranks: dist.Ranks) -> LoaderOptions:
    """What the run's data loaders make (crate_fast.data.build_loaders)."""
    # RandAugment per image on uint8 pixels, as the official finetune.py (before normalizing)
    augment = RandAugment(num_ops=2, magnitude=cfg.ra_magnitude) if cfg.randaugment else None
    return LoaderOptions(batch_size=micro_batch, img_size=cfg.img_size, num_workers=cfg.workers, device=ranks.device,
                         dtype=torch.float32, distributed=ranks.world > 1, seed=cfg.seed, flip=cfg.flip,
                         scale=cfg.scale, ratio=cfg.ratio, crop_pct=cfg.crop_pct,
                         val_batch_size=(cfg.val_batch_size or cfg.batch_size) // ranks.world,
                         progressive=cfg.progressive is not None, synthetic_steps=cfg.synthetic_steps,
                         batch_transform=augment, block_size=cfg.block_size,
                         epoch_steps=(cfg.epoch_steps or 1) * cfg.accum_steps, val_steps=cfg.val_steps or 1)


class Trainer:
    """One run: data, model, objective, optimizer (all decided here, once); fit() trains and evaluates
    epoch by epoch and saves run checkpoints (crate_fast.training.runs). resume: a run checkpoint every
    rank loads before the model is wrapped for DDP."""

    def __init__(self, cfg: TrainConfig, ranks: dist.Ranks, resume: str | None = None):
        self.cfg, self.ranks, self.device, self.is_main = cfg, ranks, ranks.device, ranks.is_main
        if cfg.batch_size % (ranks.world * cfg.accum_steps):
            raise SystemExit(f"error: --batch-size {cfg.batch_size} is not divisible by world size {ranks.world} "
                             f"x --accum-steps {cfg.accum_steps}")
        self.micro_batch = cfg.batch_size // (ranks.world * cfg.accum_steps)
        self.data = build_loaders(cfg.data, loader_options(cfg, self.micro_batch, ranks), loader=cfg.loader,
                                  cache_dir=cfg.cache_dir, data_root=cfg.data_root)
        if len(self.data.train) == 0:
            raise SystemExit(f"error: the training set has fewer samples than one batch ({self.micro_batch} per rank)")
        torch.manual_seed(cfg.seed)                     # the same initial weights on every rank
        self.model = crate_fast.create_model(cfg.arch, **model_overrides(cfg, self.data.num_classes)).to(self.device)
        runs.seed_training_draws(cfg.seed, ranks.rank)  # from here on every rank draws its own (masks, dropout ...)
        self.model.set_grad_checkpointing(cfg.grad_checkpointing)
        if cfg.finetune:
            runs.exit_on_bad_file("--finetune", cfg.finetune, lambda: crate_fast.load_weights(
                self.model, cfg.finetune, reset_head="auto", trusted=cfg.trust_checkpoint))
        self.steps_per_epoch = len(self.data.train) // cfg.accum_steps
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.lr = torch.tensor(cfg.lr, device=self.device)     # set in place each step: nothing recompiles
        self.opt = build_optimizer(self.model, cfg.opt, lr=self.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                   wd_exclude=cfg.wd_exclude)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.precision]
        self.graphed = cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")
        mark = torch.compiler.cudagraph_mark_step_begin if self.graphed else None
        run = Run(self.model, self.data, self.micro_batch, ranks, self.autocast, mark)
        self.objective = objective_for(family_of(cfg.arch).objective, cfg, run)
        # best_score: higher is better (the objective's score: val top-1, minus the val loss ...)
        self.epoch, self.step, self.best_score, self.guard = 0, 0, -math.inf, NonfiniteGuard(cfg.max_nonfinite)
        if resume:
            self.resume(resume)
        self.net = self._wrap(self.model)
        self.captured = GraphedStep(lambda x, y: self._loss(x, y), self.opt, self.scaler.scale) \
            if cfg.cuda_graph else None
        self.flops = flops_per_sample(self.model.config, training=True)
        self.peak = peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.log = RunLog(cfg.out, loggers.parse(cfg.log), dataclasses.asdict(cfg), self.is_main, cfg.log_every)

    def _wrap(self, model):
        """Regional compile (each block, fullgraph, before DDP: torchtitan's order), then DDP (built on a side
        stream for --cuda-graph, as capturing its collectives requires)."""
        if self.cfg.compile:
            for blk in model.repeated_blocks():
                blk.compile(mode=self.cfg.compile_mode, fullgraph=True)
        if self.ranks.world == 1:
            return model
        with torch.cuda.stream(torch.cuda.Stream()) if self.cfg.cuda_graph else contextlib.nullcontext():
            return torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.cfg.precision != "fp32")

    # -- run checkpoints (crate_fast.training.runs) --------------------------------------------------------
    def counters(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "best_score": self.best_score,
                "nonfinite_steps": self.guard.total}

    def save(self, best: bool) -> None:
        """last.pt (and best.pt, model.safetensors when best), written by rank 0; collective."""
        state = runs.run_state(self.model, self.opt, self.scaler, self.counters(), dataclasses.asdict(self.cfg))
        if self.is_main:
            save_atomic(state, os.path.join(self.cfg.out, "last.pt"))
            if best:
                save_atomic(state, os.path.join(self.cfg.out, "best.pt"))
                crate_fast.save_weights(self.model, os.path.join(self.cfg.out, "model.safetensors"))

    def resume(self, path: str) -> None:
        """Continue the run of checkpoint `path` (every rank loads the same file), checked against this one."""
        ckpt = runs.exit_on_bad_file("--resume", path, lambda: runs.load_run_checkpoint(path,
                                                                                    trusted=self.cfg.trust_checkpoint))
        flags = ["arch", *(f for f in model_flags() if f != "impl"), "opt", "wd_exclude"]
        runs.check_resumable(ckpt["config"], dataclasses.asdict(self.cfg), flags, path)
        counters = runs.restore(ckpt, self.model, self.opt, self.scaler, self.ranks, self.cfg.seed)
        set_lr(self.opt, self.lr)                           # the checkpoint put its own lr tensors in the groups
        self.epoch, self.step, self.best_score, self.guard.total = counters
        runs.check_same_state(self.model, self.counters())
        if self.is_main:
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step}", flush=True)

    # -- the loop ------------------------------------------------------------------------------------------
    def optimizer_step(self, finite: torch.Tensor, lr: float) -> bool:
        """Apply the accumulated gradients, unless any micro-batch loss of this step was non-finite on
        any rank: then the step is skipped on every rank (its gradients would poison the weights), and
        max_nonfinite skipped steps in a row stop the run before any NaN reaches a checkpoint.
        Returns whether the step was taken."""
        if not self.guard.all_finite(finite, self.step):
            self.opt.zero_grad(set_to_none=self.captured is None)      # a captured step keeps its grad buffers
            return False
        self.lr.fill_(lr)
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.opt)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=self.captured is None)
        self.step += 1
        return True

    def train_epoch(self) -> dict:
        cfg, train = self.cfg, self.data.train
        self.net.train()
        train.set_epoch(self.epoch)
        if cfg.progressive is not None:
            train.set_resolution(resolution_at(self.epoch, cfg.progressive, self.model.config.patch_size[0]))
        progress = Progress(self.steps_per_epoch, f"epoch {self.epoch + 1}/{cfg.epochs}", every=cfg.log_every,
                            enabled=self.is_main)
        # loss sums of the steps taken (a skipped step's losses are dropped), samples seen for throughput
        loss_sum, loss_n, seen, t0 = 0.0, 0, 0, time.perf_counter()
        micro, lr = 0, float(self.lr)
        step_loss, finite = 0.0, torch.ones((), device=self.device)
        for inputs, targets in train:       # a partial accumulation group at the end is dropped (break)
            if micro // cfg.accum_steps >= self.steps_per_epoch:
                break
            last_micro = (micro + 1) % cfg.accum_steps == 0
            if self.graphed:        # a new step: CUDA-graph outputs of the previous one may be overwritten
                torch.compiler.cudagraph_mark_step_begin()
            sync = last_micro or not hasattr(self.net, "no_sync")
            if self.captured is not None:
                loss = self.captured(inputs, targets)
            else:
                with self.net.no_sync() if not sync else contextlib.nullcontext():
                    loss = self._loss(inputs, targets)
                    self.scaler.scale(loss / cfg.accum_steps).backward()
            micro += 1
            loss = loss.detach()
            finite = finite * torch.isfinite(loss)        # every micro-batch counts, not only the last
            step_loss = step_loss + loss.float() * inputs.shape[0]
            seen += self.objective.count(inputs)
            if not last_micro:
                continue
            lr = lr_at(self.step, base_lr=cfg.lr, total_steps=self.total_steps, warmup_steps=self.warmup_steps,
                       min_lr=cfg.min_lr)
            if self.optimizer_step(finite, lr):
                loss_sum, loss_n = loss_sum + step_loss, loss_n + inputs.shape[0] * cfg.accum_steps
            step_loss, finite = 0.0, torch.ones((), device=self.device)
            progress.update(1, **self.log.progress(self.step, seen * self.ranks.world, time.perf_counter() - t0, loss,
                                                   lr, self.objective.unit, self.flops, self.peak))
        progress.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        total_loss, total_n, total_seen = dist.all_sum([float(loss_sum), loss_n, seen], self.device)
        return {"train_loss": total_loss / total_n if total_n else float("nan"),
                f"{self.objective.unit}_per_s": total_seen / dt, "lr": lr, "epoch_time": dt,
                "nonfinite_steps": self.guard.total}

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.objective.loss(self.net, inputs, targets)

    def evaluate(self) -> dict:
        return self.objective.evaluate(self.net, self.data.val)

    def fit(self) -> dict:
        cfg, row = self.cfg, {}
        while self.epoch < cfg.epochs:
            t = time.time()
            row = self.train_epoch()
            self.epoch += 1
            row.update(self.evaluate(), epoch=self.epoch, step=self.step, time=time.time() - t)
            if self.peak:
                row["mfu"] = row[f"{self.objective.unit}_per_s"] * self.flops / self.peak
            score = self.objective.score(row)
            best, self.best_score = score > self.best_score, max(self.best_score, score)
            self.save(best)
            self.log.epoch(row, f"epoch {self.epoch}/{cfg.epochs}", self.objective.describe(row), self.objective.unit)
            if cfg.stop_after is not None and cfg.stop_after <= self.epoch < cfg.epochs:
                if self.is_main:
                    print(f"stopping after epoch {self.epoch} (--stop-after); continue with --resume {cfg.out}")
                break
        return row

def main(argv=None) -> int:
    cfg = resolve(TrainConfig(**vars(build_parser().parse_args(argv))))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ranks = dist.setup(cfg.device, cfg.dist_url)
    try:
        if ranks.world > 1:
            dist.check_agree("the run's flags (start every node with the same command)", dataclasses.asdict(cfg))
            runs.check_shared_out(cfg.out)
        resume = runs.decide_resume(cfg.resume, cfg.out)
        if ranks.is_main:
            os.makedirs(cfg.out, exist_ok=True)
            resolved = {**dataclasses.asdict(cfg), "world_size": ranks.world,
                        "recipe": recipe_for(cfg.data, cfg.recipe, family_of(cfg.arch).objective)[0]}
            print("config:", json.dumps(resolved, indent=1))
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump(resolved, f, indent=1)
        trainer = Trainer(cfg, ranks, resume)
        if cfg.eval_only:
            metrics = trainer.evaluate()
            if ranks.is_main:
                print(json.dumps(metrics))
        elif trainer.fit() and ranks.is_main:
            print(f"done: best {trainer.objective.describe_best(trainer.best_score)}  (run dir {cfg.out})")
        trainer.objective.finish(trainer.model, cfg.out)        # the objective's last word: a probe, a sample
        trainer.log.close()
        dist.barrier()      # leave together: rank 0 may still be writing its checkpoint
        return 0
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
