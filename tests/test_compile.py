"""A training step the host cannot slow down (docs/RESULTS.md: the eager step is host-bound on a fast GPU):
regional compile (each block, as train.py --compile) matches eager gradients and never recompiles for a
new lr or an evaluation's partial batch; the forward and backward of every family hold no host
synchronization (CUDA-graph capturable); the optimizer takes its lr as a tensor; one eager step's aten op
count is pinned."""
import collections
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from harness import assert_rel
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

from crate_fast import create_model
from crate_fast.training.optim import Lion

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One small model of every family ("arch-variant": another setting) and what a training step feeds it.
FAMILIES = {
    "crate_tiny": dict(num_classes=10, img_size=16, patch_size=4, depth=2),
    "crate_alpha_tiny": dict(num_classes=10, img_size=16, patch_size=4, depth=2),
    "mae_crate_tiny": dict(img_size=16, patch_size=4, depth=2, decoder_depth=1),
    "crate_gpt_tiny": dict(depth=2, block_size=16),
    "crate_gpt_tiny-recompute": dict(depth=2, block_size=16, recompute=True),     # the lean backward
}
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.masked_select", "aten._unique2",
            "aten.unique_consecutive", "aten.unique_dim", "aten.equal", "aten.is_nonzero"}
# aten ops one eager train step of crate_tiny (impl="torch", CPU, fp32, batch 4, 32 px / patch 8) dispatches:
# forward 404 + backward 750 + fused AdamW 6. The foreach AdamW it replaced took 230 (1,384 in all).
OP_BUDGET = 1160


def build(arch, **kw):
    torch.manual_seed(0)
    return create_model(arch.split("-")[0], **FAMILIES[arch], **kw)


def loss_of(model, arch, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    if arch.startswith("crate_gpt"):
        idx = torch.randint(0, 256, (batch, 16), generator=g)
        return model(idx, torch.randint(0, 256, (batch, 16), generator=g))[1]
    x = torch.randn(batch, 3, 16, 16, generator=g)
    if arch.startswith("mae"):
        return model(x, noise=torch.rand(batch, 16, generator=g))[0]
    return F.cross_entropy(model(x), torch.randint(0, 10, (batch,), generator=g))


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_compiled_blocks_match_eager_gradients_and_never_recompile(arch):
    eager, compiled = build(arch, impl="torch"), build(arch, impl="torch")
    for blk in compiled.repeated_blocks():
        blk.compile(fullgraph=True, backend="aot_eager" if arch != "crate_tiny" else "inductor")
    loss_of(eager, arch).backward()
    torch._dynamo.reset()
    counters.clear()
    for blk in compiled.repeated_blocks():                   # reset() dropped the compiled code: compile again
        blk.compile(fullgraph=True, backend="aot_eager" if arch != "crate_tiny" else "inductor")
    loss_of(compiled, arch).backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        if p.grad is not None:
            assert_rel(q.grad, p.grad, 1e-6, name)
    graphs = counters["stats"]["unique_graphs"]
    lr = torch.tensor(1e-3)
    opt = torch.optim.AdamW(compiled.parameters(), lr=lr, fused=True)
    for step in range(3):                                     # a new lr every step: nothing recompiles
        lr.fill_(1e-3 * (step + 1))
        loss_of(compiled, arch, seed=step).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    compiled.eval()
    with torch.no_grad():
        loss_of(compiled, arch, batch=3)                      # the last, partial batch of an evaluation
    assert counters["stats"]["unique_graphs"] == graphs and not counters["recompiles"], dict(counters["recompiles"])


def test_a_compiled_lion_step_takes_a_new_lr_without_recompiling():
    """A float lr is a constant of the compiled graph: each new value recompiled (and past 8, dynamo fell
    back to eager). The tensor lr train.py passes is an input."""
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(4))]
    lr = torch.tensor(1e-3)
    torch._dynamo.reset()
    step = torch.compile(Lion(params, lr=lr, weight_decay=0.1).step, backend="aot_eager")
    for i in range(5):
        if i == 2:                       # the first step creates the optimizer state, the second compiles
            counters.clear()             # the steady step (a float lr recompiles at every new value)
        lr.fill_(1e-3 / (i + 1))
        for p in params:
            p.grad = torch.randn_like(p)
        step()
    assert counters["stats"].get("unique_graphs", 0) == 0 and not counters["recompiles"], dict(counters)


def test_fused_adamw_with_a_tensor_lr_follows_the_lr_in_place():
    """train.py's AdamW: fused (one update for every parameter, CPU and CUDA) with a shared tensor lr, the
    same steps as the foreach AdamW with float lrs."""
    a = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
    b = [p.detach().clone().requires_grad_() for p in a]
    lr = torch.tensor(1e-2)
    fused, plain = torch.optim.AdamW(a, lr=lr, fused=True), torch.optim.AdamW(b, lr=1e-2, foreach=True)
    for i in range(4):
        lr.fill_(1e-2 / (i + 1))
        plain.param_groups[0]["lr"] = 1e-2 / (i + 1)
        for p, q in zip(a, b, strict=True):
            p.grad = q.grad = torch.randn_like(p)
        fused.step()
        plain.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_lion_with_a_tensor_lr_is_lion_with_a_float_one():
    a = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
    b = [p.detach().clone().requires_grad_() for p in a]
    lr = torch.tensor(3e-3)
    ours, ref = Lion(a, lr=lr, weight_decay=0.5), Lion(b, lr=3e-3, weight_decay=0.5)
    for _ in range(5):
        for p, q in zip(a, b, strict=True):
            p.grad = q.grad = torch.randn_like(p)
        ours.step()
        ref.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ["reference", "torch"])
@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_forward_and_backward_hold_no_host_sync(arch, impl):
    """What would stop a CUDA-graph capture (or make the host wait on the GPU) inside a step: an op that
    reads a value back (.item(), nonzero, data-dependent shapes). Under bf16 autocast, as training runs."""
    model = build(arch, impl=impl).train()
    with _Ops() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model, arch)
        loss.backward()
    assert not SYNC_OPS & set(seen.ops), sorted(SYNC_OPS & set(seen.ops))


def test_one_eager_train_step_stays_within_its_launch_budget():
    """Every aten op is at least one kernel launch on a GPU, whatever the width: a change that adds launches
    to the step shows up here (OP_BUDGET's comment has the split)."""
    torch.manual_seed(0)
    model = create_model("crate_tiny", num_classes=10, img_size=32, patch_size=8, impl="torch")
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3), fused=True)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    F.cross_entropy(model(x), y).backward()
    opt.step()                                              # the optimizer state exists from here on
    opt.zero_grad(set_to_none=True)
    with _Ops() as seen:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert sum(seen.ops.values()) <= OP_BUDGET, (sum(seen.ops.values()), seen.ops.most_common(10))


@pytest.mark.slow
def test_a_two_process_compiled_run_trains(tmp_path):
    """train.py --compile under torchrun with 2 gloo ranks: each block compiled before DDP wraps the model."""
    out = tmp_path / "compiled"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        os.path.join(ROOT, "train.py"), "--arch", "crate_tiny", "--data", "synthetic",
                        "--synthetic-steps", "3", "--img-size", "16", "--patch-size", "4", "--batch-size", "8",
                        "--epochs", "1", "--workers", "1", "--compile", "--out", str(out)],
                       capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert (out / "last.pt").exists() and "epoch 1/1" in p.stdout
