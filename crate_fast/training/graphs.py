"""``train.py --cuda-graph``: the forward and backward of a training step captured once as one CUDA graph and
replayed every step, so the host launches one graph instead of ~1,150 kernels (docs/RESULTS.md: the eager
step of CRATE-T is host-bound on an H100). torchtitan's capture of its eager step (distributed/cudagraph.py)
and PyTorch's "whole network capture" recipe (CUDA semantics notes, with DDP) are the models:

- inputs are copied into static buffers, the graph replays, the loss is read from its static output;
- warm-up on a side stream first (DDP: 11 eager iterations, so its buckets are built before capture), one
  memory pool, gradients kept allocated between steps (zero_grad(set_to_none=False));
- the optimizer step, the gradient clipping and the NaN guard's one host read stay outside the graph (the
  lr is a tensor, so the optimizer could be captured too);
- one graph per input shape: training batches are fixed (drop_last); progressive resizing changes them and
  is refused, as are host-side random draws inside the step (timm's mixup) and gradient accumulation.

It needs a GPU and cannot be tested on one without; bench/run_gpu.sh exercises it.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_STEPS = 11          # DDP needs 11 eager iterations before capture (PyTorch's CUDA graphs notes)


def refusal(cfg) -> str | None:
    """Why --cuda-graph cannot run with these flags (the message names the fix), or None."""
    if not cfg.device.startswith("cuda"):
        return "--cuda-graph captures CUDA kernels: it needs --device cuda"
    if cfg.progressive is not None:
        return "--cuda-graph captures one input shape and --progressive changes it every few epochs: drop one"
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return "--cuda-graph would freeze timm's mixup/cutmix draws (made on the host): drop --mixup/--cutmix"
    if cfg.accum_steps != 1:
        return "--cuda-graph captures whole steps: use a --batch-size without --accum-steps"
    if cfg.compile:
        return "--cuda-graph and --compile both replace the eager step: pick one (--compile-mode reduce-overhead " \
               "gives compiled CUDA graphs)"
    return None


class GraphedStep:
    """loss = step(inputs, targets): forward + backward of `loss_fn(inputs, targets)` (scaled by `scale`,
    a GradScaler's scale) replayed from one CUDA graph. The first WARMUP_STEPS calls run eagerly on a side
    stream; the next captures; every later call copies its batch into the static buffers and replays.
    Returns the step's loss (a static tensor: read it before the next call)."""

    def __init__(self, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], optimizer, scale):
        self.loss_fn, self.optimizer, self.scale = loss_fn, optimizer, scale
        self.calls, self.graph, self.static = 0, None, None
        self.stream = torch.cuda.Stream()

    def _forward_backward(self, inputs, targets) -> torch.Tensor:
        loss = self.loss_fn(inputs, targets)
        self.scale(loss).backward()
        return loss.detach()

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.graph is not None:
            if inputs.shape != self.static[0].shape:
                raise RuntimeError(f"--cuda-graph captured batches of {tuple(self.static[0].shape)}, got "
                                   f"{tuple(inputs.shape)}")
            self.static[0].copy_(inputs)
            self.static[1].copy_(targets)
            self.graph.replay()
            return self.static[2]
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            if self.calls <= WARMUP_STEPS:
                loss = self._forward_backward(inputs, targets)
            else:
                self.optimizer.zero_grad(set_to_none=False)      # the graph writes into these .grad tensors
                self.static = [inputs.clone(), targets.clone(), None]
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.static[2] = self._forward_backward(self.static[0], self.static[1])
                self.graph.replay()
                loss = self.static[2]
        torch.cuda.current_stream().wait_stream(self.stream)
        return loss
