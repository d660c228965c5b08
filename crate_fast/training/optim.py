"""Optimizers and the learning-rate schedule of a training run.

- :class:`Lion` (Chen et al. 2023), the CRATE paper's optimizer, as a foreach implementation: the
  same update as lion-pytorch (the official code's dependency), a handful of fused multi-tensor ops.
- :func:`lr_at`: per-step linear warmup then cosine decay, a pure function of the step (so resuming
  needs no scheduler state).
- :func:`param_groups`: optional weight-decay exclusion for norms, biases, position and class tokens.
- :func:`build_optimizer`: the optimizer a run names.
"""
from __future__ import annotations

import math

import torch


class Lion(torch.optim.Optimizer):
    """Lion: p <- p (1 - lr wd) - lr sign(beta1 m + (1 - beta1) g);  m <- beta2 m + (1 - beta2) g.

    lr may be a 0-dim tensor (on the parameters' device): changing it in place changes the next step
    without recompiling a compiled step or recapturing a graph."""

    def __init__(self, params, lr: float | torch.Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1], got {betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if "exp_avg" not in self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            avgs = [self.state[p]["exp_avg"] for p in params]
            lr, wd, (beta1, beta2) = group["lr"], group["weight_decay"], group["betas"]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            update = torch._foreach_lerp(avgs, grads, 1.0 - beta1)     # beta1 m + (1 - beta1) g
            torch._foreach_sign_(update)
            if isinstance(lr, torch.Tensor):                            # alpha= takes numbers only
                torch._foreach_mul_(update, lr)
                torch._foreach_sub_(params, update)
            else:
                torch._foreach_add_(params, update, alpha=-lr)
            torch._foreach_lerp_(avgs, grads, 1.0 - beta2)             # m <- beta2 m + (1 - beta2) g
        return loss


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warmup from 0 over warmup_steps, then cosine from base_lr to min_lr at total_steps."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float, exclude_norm_bias_tokens: bool) -> list[dict]:
    """One group with weight decay on everything (the official recipe), or two: decayed weights and
    undecayed norms / biases / position and class tokens."""
    if not exclude_norm_bias_tokens:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, name: str, *, lr: torch.Tensor, betas: tuple[float, float],
                    weight_decay: float, wd_exclude: bool) -> torch.optim.Optimizer:
    """The optimizer of a run over :func:`param_groups`: "lion" (:class:`Lion`, foreach) or "adamw" (torch's
    fused kernel: one update for all parameters, on CUDA and CPU alike, instead of a few hundred foreach
    launches). lr: a 0-dim tensor every group shares (set_lr), so the schedule changes it in place and a
    compiled or captured step never sees a new constant. Raises ValueError for another name."""
    groups = param_groups(model, weight_decay, wd_exclude)
    if name == "lion":
        opt = Lion(groups, lr=lr, betas=betas)
    elif name == "adamw":
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    else:
        raise ValueError(f"optimizer must be 'lion' or 'adamw', got {name!r}")
    return set_lr(opt, lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: torch.Tensor) -> torch.optim.Optimizer:
    """Make every group of the optimizer read the one lr tensor (again after load_state_dict, which puts
    the checkpoint's own tensor in each group). Returns the optimizer."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    return optimizer
