"""What a training run optimizes and how it is evaluated: one class per objective a model family declares
(models/family.py ``objective``), chosen once per run by :func:`objective_for`.

The interface every objective implements (a language-modeling objective is the next one):
    for_run(cfg, run)            the objective of a train.py run (its flags, the model and data it has)
    loss(net, inputs, targets)   the mean loss of one micro-batch, in the training mode of `net`
    count(inputs)                the samples of a batch for throughput: images, or tokens (unit)
    evaluate(net, loader)        metrics over the whole validation set, summed over every rank
    score(metrics)               what "best" means (higher is better): top-1, or minus the val loss
    describe(metrics)            the objective's part of the epoch's log line
    finish(model, out)           after training, on rank 0: what the run shows at its end (a text sample)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from crate_fast.data import text
from crate_fast.data.sources import Loaders
from crate_fast.probe import linear_probe
from crate_fast.registry import create_model

from .dist import Ranks, all_sum, gather_rows
from .recipes import model_overrides


@dataclass(frozen=True)
class Run:
    """What an objective may need of a train.py run besides its flags."""

    model: torch.nn.Module
    data: Loaders                      # train, val, num_classes (token data: the vocabulary), tokenizer
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

    @staticmethod
    def count(inputs: torch.Tensor) -> int:
        return inputs.shape[0]

    def finish(self, model, out: str) -> None:
        """What a run shows at its end (every rank calls it; rank 0 writes): nothing here."""

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
                          num_classes=run.data.num_classes)
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
    generator seeded by seed, the batch number and the rank), so epochs compare; beside it the loss of the
    per-position mean (val_loss_mean_baseline: each masked patch predicted by the mean of the training
    images' patches at its position, from up to BASELINE_BATCHES training batches): a model above it has
    not learned to reconstruct from context. model: the (unwrapped) CRATEMAE; means: position_means'.
    The means are taken when the run starts (for_run), at the same point of a fresh and a resumed run."""

    name = "masked_autoencoding"
    BASELINE_BATCHES = 50

    def __init__(self, device, autocast, mark_step=None, *, model, means: torch.Tensor | None = None, seed: int = 0,
                 rank: int = 0, world: int = 1, probe: Callable[[torch.nn.Module, str], dict] | None = None):
        super().__init__(device, autocast, mark_step)
        self.model, self.means, self.seed, self.rank, self.world = model, means, seed, rank, world
        self.patches, self.probe = model.config.num_patches, probe

    @classmethod
    def for_run(cls, cfg, run: Run) -> MaskedAutoencoding:
        """With --probe: the run ends with linear probes of the encoder (run_probe)."""
        probe = (lambda model, out: run_probe(model, cfg, run, out)) if cfg.probe else None
        means = cls.position_means(run.model, run.data.train)
        return cls(run.ranks.device, run.autocast, run.mark_step, model=run.model, means=means, seed=cfg.seed,
                   rank=run.ranks.rank, world=run.ranks.world, probe=probe)

    @classmethod
    @torch.no_grad()
    def position_means(cls, model, train: Iterable) -> torch.Tensor | None:
        """(L, patch_dim) mean target patch per position over the first BASELINE_BATCHES training batches of
        every rank (the targets forward_loss compares with: standardized per patch under norm_pix_loss)."""
        total, n = None, 0
        for i, (images, _) in enumerate(train):
            if i == cls.BASELINE_BATCHES:
                break
            target = model.patchify(images.float())
            if model.config.norm_pix_loss:
                target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
            total, n = target.sum(0) if total is None else total + target.sum(0), n + images.shape[0]
        if total is None:
            return None
        if torch.distributed.is_initialized():
            count = torch.tensor([float(n)], device=total.device)
            torch.distributed.all_reduce(total)
            torch.distributed.all_reduce(count)
            n = count.item()
        return total / n

    def finish(self, model, out: str) -> None:
        if self.probe is not None:
            self.probe(model, out)

    def loss(self, net, images: torch.Tensor, labels: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        return net(images, noise=noise)[0]

    @torch.no_grad()
    def evaluate(self, net, loader: Iterable) -> dict:
        loss_sum = base_sum = n = 0.0
        for i, (images, _) in self._batches(net, loader):
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i * self.world + self.rank)
            noise = torch.rand(images.shape[0], self.patches, generator=gen).to(self.device)
            with self.autocast():
                loss, _, mask = net(images, noise=noise)
            loss_sum += loss.float().item() * images.shape[0]
            if self.means is not None:
                mean_pred = self.means.expand(images.shape[0], -1, -1)
                base_sum += self.model.forward_loss(images.float(), mean_pred, mask.float()).item() * images.shape[0]
            n += images.shape[0]
        loss_sum, base_sum, n = all_sum([loss_sum, base_sum, n], self.device)
        out = {"val_loss": loss_sum / max(n, 1), "val_samples": int(n)}
        if self.means is not None:
            out["val_loss_mean_baseline"] = base_sum / max(n, 1)
        return out

    @staticmethod
    def score(metrics: dict) -> float:
        return -metrics["val_loss"]

    @staticmethod
    def describe(metrics: dict) -> str:
        base = metrics.get("val_loss_mean_baseline")
        return "" if base is None else f"(per-position mean {base:.4f})"

    @staticmethod
    def describe_best(score: float) -> str:
        return f"val loss {-score:.4f}"


class LanguageModeling(Objective):
    """Next-token prediction (a CRATE-GPT's forward with targets: the mean cross-entropy, ignore_index -1).
    Evaluation: the loss over every validation token and its perplexity; the run ends with a text sample
    (finish) when the data's tokenizer is known. Throughput counts tokens."""

    name, unit = "language_modeling", "tok"

    def __init__(self, device, autocast, mark_step=None, *, tokenizer: str | None = None, seed: int = 0,
                 rank: int = 0):
        super().__init__(device, autocast, mark_step)
        self.tokenizer, self.seed, self.rank = tokenizer, seed, rank

    @classmethod
    def for_run(cls, cfg, run: Run) -> LanguageModeling:
        vocab = run.data.num_classes
        if vocab > run.model.config.vocab_size:
            raise SystemExit(f"error: the data's token ids go up to {vocab - 1}, beyond this model's vocab_size "
                             f"{run.model.config.vocab_size}: pick another --arch or data")
        return cls(run.ranks.device, run.autocast, run.mark_step, tokenizer=run.data.tokenizer, seed=cfg.seed,
                   rank=run.ranks.rank)

    @staticmethod
    def count(inputs: torch.Tensor) -> int:
        return inputs.numel()

    def loss(self, net, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return net(idx, targets)[1]

    @torch.no_grad()
    def evaluate(self, net, loader: Iterable) -> dict:
        loss_sum = n = 0.0
        for _, (idx, targets) in self._batches(net, loader):
            with self.autocast():
                loss = self.loss(net, idx, targets)
            loss_sum += loss.float().item() * targets.numel()
            n += targets.numel()
        loss_sum, n = all_sum([loss_sum, n], self.device)
        return {"val_loss": loss_sum / max(n, 1), "val_ppl": math.exp(min(loss_sum / max(n, 1), 50.0)),
                "val_tokens": int(n)}

    @staticmethod
    def score(metrics: dict) -> float:
        return -metrics["val_loss"]

    @staticmethod
    def describe(metrics: dict) -> str:
        return f"ppl {metrics['val_ppl']:.2f}"

    @staticmethod
    def describe_best(score: float) -> str:
        return f"val loss {-score:.4f} (ppl {math.exp(-score):.2f})"

    def finish(self, model, out: str, prompt: str = "The ", tokens: int = 400) -> None:
        """Sample `tokens` tokens after `prompt` (temperature 0.8, top 50, seeded by --seed), print them and
        write RUN_DIR/sample.txt (rank 0). Nothing when the data's tokenizer is unknown or not installed."""
        if self.rank != 0:
            return
        try:
            tok = text.tokenizer(self.tokenizer) if self.tokenizer else None
        except ImportError:
            tok = None
        if tok is None:
            return
        was_training = model.training
        model.eval()
        idx = torch.tensor([tok.encode(prompt)], device=self.device)
        gen = torch.Generator(device=self.device).manual_seed(self.seed)
        with self.autocast():
            sample = tok.decode(model.generate(idx, tokens, temperature=0.8, top_k=50, generator=gen)[0].tolist())
        model.train(was_training)
        with open(os.path.join(out, "sample.txt"), "w", encoding="utf-8") as f:
            f.write(sample)
        print(f"sample (temperature 0.8, top 50):\n{sample}", flush=True)


def run_probe(model, cfg, run: Run, out: str) -> dict:
    """``train.py --probe``: linear probes (crate_fast.probe) of the trained encoder and, for comparison, of
    the same encoder at initialization (--seed's weights), each on the CLS token (what FAIR MAE's
    main_linprobe.py and the authors' book probe) and on the mean of the patch tokens (FAIR's global pool:
    the CLS token gets no reconstruction loss, and on small data its features can trail the init's).
    Every rank extracts its shard of the features and fits on all of them (gathered); rank 0 prints the
    four and writes RUN_DIR/probe.json: {"pretrained" | "init": {"cls" | "mean": linear_probe's row}}."""
    torch.manual_seed(cfg.seed)                          # the initial weights the run started from
    init = create_model(cfg.arch, **model_overrides(cfg)).to(run.ranks.device)
    rows = {name: {pool: linear_probe(m, run.data.train, run.data.val, pool, gather=gather_rows)
                   for pool in ("cls", "mean")}
            for name, m in (("pretrained", model), ("init", init))}
    if run.ranks.is_main:
        for name, by_pool in rows.items():
            print(f"linear probe ({name} encoder): val top-1 {by_pool['cls']['val_top1']:.2f} (CLS token), "
                  f"{by_pool['mean']['val_top1']:.2f} (mean of the patch tokens)", flush=True)
        with open(os.path.join(out, "probe.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return rows


OBJECTIVES = {cls.name: cls for cls in (Classification, MaskedAutoencoding, LanguageModeling)}


def objective_for(name: str, cfg, run: Run) -> Objective:
    """The objective a family declares (its ``objective`` name) for a train.py run (its flags `cfg`).
    Raises ValueError for an objective train.py has no implementation of."""
    if name not in OBJECTIVES:
        raise ValueError(f"train.py has no {name!r} objective; it trains: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name].for_run(cfg, run)
