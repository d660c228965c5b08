"""Where a training step's time goes: torch.profiler over a few steps, ops ranked by their share of the
step's device time (self time: each op counted once, not under its callers). The fusion candidates
named in docs/RESULTS.md are read off this table.

    python bench/profile_step.py --arch crate_base --impl triton --batch 256 > profile.txt     # GPU, bf16
    python bench/profile_step.py --arch crate_tiny --img-size 32 --patch-size 8 --batch 8       # CPU check

A classification step (cross-entropy) for image families, the language-modeling loss for CRATE-GPT;
AdamW fused; bf16 autocast on CUDA, fp32 on CPU.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from crate_fast import create_model
from crate_fast.registry import family_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="crate_base")
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img-size", type=int, help="image families: input size (default the preset's)")
    ap.add_argument("--patch-size", type=int)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps, after 3 warm-up steps")
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    overrides = {k: v for k, v in (("img_size", args.img_size), ("patch_size", args.patch_size)) if v}
    model = create_model(args.arch, impl=args.impl, **overrides).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-4, device=device), fused=True)
    cfg = model.config
    if family_of(args.arch).objective == "language_modeling":
        idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.block_size + 1), device=device)
        x, y = idx[:, :-1], idx[:, 1:]

        def loss():
            return model(x, y)[1]
    else:
        size = tuple(cfg.img_size) if isinstance(cfg.img_size, (tuple, list)) else (cfg.img_size,) * 2
        x = torch.randn(args.batch, 3, *size, device=device)
        y = torch.randint(0, getattr(cfg, "num_classes", 1000), (args.batch,), device=device)

        def loss():
            out = model(x)
            return out[0] if isinstance(out, tuple) else F.cross_entropy(out, y)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = sum(getattr(e, key) for e in events) or 1.0
    print(f"{args.arch} impl={args.impl} batch {args.batch} on {torch.cuda.get_device_name(0) if cuda else 'cpu'}: "
          f"{total / args.steps / 1e3:.2f} ms of {'device' if cuda else 'CPU'} self time per step")
    print(f"{'share':>6}  {'ms/step':>8}  {'calls/step':>10}  op")
    for e in sorted(events, key=lambda e: -getattr(e, key))[:args.top]:
        t = getattr(e, key)
        print(f"{100 * t / total:5.1f}%  {t / args.steps / 1e3:8.3f}  {e.count // args.steps:10d}  {e.key[:90]}")


if __name__ == "__main__":
    main()
