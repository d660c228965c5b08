"""What a training run optimizes and how it is evaluated: one class per objective a model family declares
(models/family.py ``objective``), chosen once per run by :func:`objective_for`.

The interface every objective implements (a language-modeling objective is the next one):
    for_run(cfg, run)            the objective of a train.py run (its flags, the model and data it has)
    loss(net, inputs, targets)   the mean loss of one micro-batch, in the training mode of `net`
    evaluate(net, loader)        metrics over the whole validation set, summed over every rank
    score(metrics)               what "best" means (higher is better): top-1, or minus the val loss
    describe(metrics)            the objective's part of the epoch's log line
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dist import Ranks, all_sum


@dataclass(frozen=True)
class Run:
    """What an objective may need of a train.py run besides its flags."""

    model: torch.nn.Module
    num_classes: int
    micro_batch: int                   # samples per rank and micro-batch
    ranks: Ranks
    autocast: Callable[[], contextlib.AbstractContextManager]
    mark_step: Callable[[], None] | None = None


class Objective:
    """Shared evaluation plumbing. device: where batches live; autocast: a context factory for the run's
    precision; mark_step: called before each evaluation batch (CUDA-graph step marks), or None."""

    name = ""
    unit = "img"             # what a sample is, for throughput: "img" (images), "tok" (tokens)

    def __init__(self, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                 mark_step: Callable[[], None] | None = None):
        self.device, self.autocast, self.mark_step = device, autocast, mark_step

    def _batches(self, net, loader: Iterable):
        net.eval()
        for i, batch in enumerate(loader):
            if self.mark_step is not None:
                self.mark_step()
            yield i, batch


class Classification(Objective):
    """Cross-entropy with label smoothing, on timm's mixed soft targets when mixup / cutmix is on (a
    timm.data.Mixup, or None). Evaluation: loss, top-1 and top-5 over every validation sample."""

    name = "classification"

    def __init__(self, device, autocast, mark_step=None, *, label_smoothing: float = 0.0, mixup=None):
        super().__init__(device, autocast, mark_step)
        self.label_smoothing, self.mixup = label_smoothing, mixup

    @classmethod
    def for_run(cls, cfg, run: Run) -> Classification:
        """With timm's Mixup/CutMix on the normalized batch when --mixup or --cutmix is on. Raises
        SystemExit for an odd per-rank batch under mixing (it pairs images)."""
        mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            from timm.data import Mixup  # optional dependency (train.py checks it)

            if run.micro_batch % 2:
                raise SystemExit(f"error: mixup/cutmix pair images in a batch; the per-rank batch {run.micro_batch} "
                                 "must be even")
            mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                          switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                          num_classes=run.num_classes)
        return cls(run.ranks.device, run.autocast, run.mark_step, label_smoothing=cfg.label_smoothing, mixup=mixup)

    def loss(self, net, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.mixup is not None and net.training:
            # timm's Mixup mixes in place: on a copy, so a loader that serves one tensor again (synthetic
            # data) or keeps the batch is never changed (a resumed run would otherwise see other images)
            images, soft = self.mixup(images.clone(), labels)
            return torch.sum(-soft * F.log_softmax(net(images).float(), dim=-1), dim=-1).mean()
        return F.cross_entropy(net(images), labels, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, net, loader: Iterable) -> dict:
        loss_sum = top1 = top5 = n = 0.0
        for _, (images, labels) in self._batches(net, loader):
            with self.autocast():
                logits = net(images)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            top1 += (top[:, 0] == labels).sum().item()
            top5 += (top == labels[:, None]).any(1).sum().item()
            n += labels.numel()
        loss_sum, top1, top5, n = all_sum([loss_sum, top1, top5, n], self.device)
        return {"val_loss": loss_sum / max(n, 1), "val_top1": 100 * top1 / max(n, 1),
                "val_top5": 100 * top5 / max(n, 1), "val_samples": int(n)}

    @staticmethod
    def score(metrics: dict) -> float:
        return metrics["val_top1"]

    @staticmethod
    def describe(metrics: dict) -> str:
        return f"top1 {metrics['val_top1']:.2f}  top5 {metrics['val_top5']:.2f}"

    @staticmethod
    def describe_best(score: float) -> str:
        return f"top-1 {score:.2f}%"


class MaskedAutoencoding(Objective):
    """CRATE-MAE's reconstruction loss (the model's forward: per-patch MSE on the masked patches; labels
    unused). Evaluation: the loss over the validation set under the same masks every epoch (noise from a
    generator seeded by seed, the batch number and the rank), so epochs compare. patches: masks' length."""

    name = "masked_autoencoding"

    def __init__(self, device, autocast, mark_step=None, *, patches: int, seed: int = 0, rank: int = 0,
                 world: int = 1):
        super().__init__(device, autocast, mark_step)
        self.patches, self.seed, self.rank, self.world = patches, seed, rank, world

    @classmethod
    def for_run(cls, cfg, run: Run) -> MaskedAutoencoding:
        return cls(run.ranks.device, run.autocast, run.mark_step, patches=run.model.config.num_patches, seed=cfg.seed,
                   rank=run.ranks.rank, world=run.ranks.world)

    def loss(self, net, images: torch.Tensor, labels: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        return net(images, noise=noise)[0]

    @torch.no_grad()
    def evaluate(self, net, loader: Iterable) -> dict:
        loss_sum = n = 0.0
        for i, (images, _) in self._batches(net, loader):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i * self.world + self.rank)
            noise = torch.rand(images.shape[0], self.patches, generator=gen).to(self.device)
            with self.autocast():
                loss = self.loss(net, images, None, noise)
            loss_sum += loss.float().item() * images.shape[0]
            n += images.shape[0]
        loss_sum, n = all_sum([loss_sum, n], self.device)
        return {"val_loss": loss_sum / max(n, 1), "val_samples": int(n)}

    @staticmethod
    def score(metrics: dict) -> float:
        return -metrics["val_loss"]

    @staticmethod
    def describe(metrics: dict) -> str:
        return ""

    @staticmethod
    def describe_best(score: float) -> str:
        return f"val loss {-score:.4f}"


OBJECTIVES = {cls.name: cls for cls in (Classification, MaskedAutoencoding)}


def objective_for(name: str, cfg, run: Run) -> Objective:
    """The objective a family declares (its ``objective`` name) for a train.py run (its flags `cfg`).
    Raises ValueError for an objective train.py has no implementation of."""
    if name not in OBJECTIVES:
        raise ValueError(f"train.py has no {name!r} objective; it trains: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name].for_run(cfg, run)
