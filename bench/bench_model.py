"""Model-level speed: training step (forward + backward + optimizer) and inference, img/s, MFU, memory.

Every impl of each family side by side ("reference" is the official code's math: the CRATE and
CRATE-MAE official forms, the CRATE-alpha port's autograd form) with timm's ViT-S/16 and ViT-B/16
(what users would otherwise pick). GPU: the presets at 224 px (CRATE-alpha-B/16, CRATE-MAE-B
pretraining at mask ratio 0.75), batch 256, bf16 autocast, fused AdamW. CPU: crate_tiny (and ViT-S, the
same width) at 32 px / patch 4 (65 tokens), batch 32; CRATE-alpha-B at 32 px / patch 8 (17 tokens),
batch 16; mae_crate_tiny pretraining at 32 px / patch 4, batch 16; fp32: ratios only.
MFU counts the model's useful FLOPs (crate_fast.flops, 2-GEMM ISTA) for every impl. "compile" is train.py's
--compile (each block compiled, the torch impl); "graphs" is train.py --cuda-graph (the triton impl's forward
and backward replayed as one captured CUDA graph, crate_fast.training.graphs; the optimizer step outside).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _common import CUDA, DEVICE, annotate, autocast, run, saved_activation_bytes, sync

from crate_fast import create_model, get_config
from crate_fast.flops import flops_per_image, peak_flops, vit_flops_per_image
from crate_fast.training.graphs import WARMUP_STEPS, GraphedStep

if CUDA:
    IMG, PATCH, BATCH, DTYPE = 224, 16, 256, torch.bfloat16
    PRESETS = ["crate_tiny", "crate_small", "crate_base", "crate_large", "crate_alpha_base", "mae_crate_base"]
    SIZES = {}                                  # arch -> (img, patch, batch) where not the defaults
    # graphs: the triton impl's forward + backward captured as one CUDA graph (no per-kernel launch cost)
    IMPLS = ["reference", "torch", "triton", "compile", "graphs"]
    COMPILE_PRESETS = {"crate_base", "crate_alpha_base", "mae_crate_base"}   # ~1 min per model: the headline presets
    VITS = {"vit_small_patch16_224": (384, 6), "vit_base_patch16_224": (768, 12)}
else:
    IMG, PATCH, BATCH, DTYPE = 32, 4, 32, torch.float32
    PRESETS = ["crate_tiny", "crate_alpha_base", "mae_crate_tiny"]
    SIZES = {"crate_alpha_base": (32, 8, 16), "mae_crate_tiny": (32, 4, 16)}
    IMPLS = ["reference", "torch", "compile"]
    COMPILE_PRESETS = {"crate_tiny", "crate_alpha_base", "mae_crate_tiny"}
    VITS = {"vit_small_patch16_224": (384, 6)}
NUM_CLASSES = 1000


def _is_mae(arch: str) -> bool:
    return arch.startswith("mae_")


def _sizes(arch: str) -> tuple[int, int, int]:
    return SIZES.get(arch, (IMG, PATCH, BATCH))


def _build(arch: str, impl: str):
    torch.manual_seed(0)
    img, patch, _ = _sizes(arch)
    if arch.startswith("vit"):
        timm = pytest.importorskip("timm")
        model = timm.create_model(arch, pretrained=False, img_size=img, patch_size=patch, num_classes=NUM_CLASSES)
        dim, depth = VITS[arch]
        flops = vit_flops_per_image(dim, 12, img=img, patch=patch, classes=NUM_CLASSES, training=True)
    else:
        sizes = dict(img_size=img, patch_size=patch) if _is_mae(arch) else \
            dict(img_size=img, patch_size=patch, num_classes=NUM_CLASSES)
        model = create_model(arch, impl={"compile": "torch", "graphs": "triton"}.get(impl, impl), **sizes)
        flops = flops_per_image(get_config(arch, **sizes), training=True)
    model = model.to(DEVICE)
    if impl == "compile":                                # regional: each block, as train.py --compile
        for blk in model.repeated_blocks():
            blk.compile(fullgraph=True)
    return model, flops


def _cases():
    for arch in PRESETS:
        for impl in IMPLS:
            if impl not in ("compile", "graphs") or arch in COMPILE_PRESETS:
                yield arch, impl
    for arch in VITS:
        yield arch, "timm"


@pytest.mark.parametrize("arch,impl", list(_cases()), ids=lambda v: v)
def test_train_step(benchmark, arch, impl):
    img, patch, batch = _sizes(arch)
    benchmark.group = f"train-{arch if arch in SIZES or _is_mae(arch) else 'classifier'}-{img}px-b{batch}"
    model, flops = _build(arch, impl)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=CUDA)
    x = torch.randn(batch, 3, img, img, device=DEVICE)
    y = torch.randint(0, NUM_CLASSES, (batch,), device=DEVICE)
    # MAE pretraining: the same masks every step (one noise tensor), as a fixed-shape benchmark wants
    noise = torch.rand(batch, (img // patch) ** 2, device=DEVICE)

    def forward(x=x, y=y):
        with autocast(DTYPE):
            return model(x, noise=noise)[0] if _is_mae(arch) else F.cross_entropy(model(x), y)

    graphed = GraphedStep(forward, opt, lambda loss: loss) if impl == "graphs" else None

    def step():
        if graphed is not None:
            graphed(x, y)
        else:
            forward().backward()
        opt.step()
        opt.zero_grad(set_to_none=graphed is None)

    for _ in range(WARMUP_STEPS + 2 if graphed is not None else 1):     # autotune / compile / capture
        step()
    sync()
    # Saved-tensor hooks would make torch.compile re-trace; graphs saves what triton saves.
    activations = saved_activation_bytes(forward, params=list(model.parameters())) if impl != "graphs" else None
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        step()
        sync()
        peak = torch.cuda.max_memory_allocated()
    seconds = run(benchmark, step, rounds=10 if CUDA else None)
    extra = dict(arch=arch, impl=impl, batch=batch, img=img, patch=patch)
    if activations is not None:
        extra["activation_mb"] = round(activations / 2**20, 1)
    if CUDA:
        extra["peak_mem_mb"] = round(peak / 2**20, 1)
        peak_fl = peak_flops(torch.cuda.get_device_name(0))
        if peak_fl:
            extra["mfu"] = round(flops * batch / seconds / peak_fl, 4)
    annotate(benchmark, seconds, flops=flops * batch, images=batch, **extra)


# compile and graphs are training-step features: evaluation runs compiled blocks eagerly (run_block) and
# GraphedStep captures forward + backward, so inference measures the three eager impls (and ViT).
@pytest.mark.parametrize("arch,impl", [c for c in _cases() if not _is_mae(c[0]) and c[1] not in ("compile", "graphs")],
                         ids=lambda v: v)
def test_inference(benchmark, arch, impl):
    img, patch, batch = _sizes(arch)
    benchmark.group = f"infer-{arch if arch in SIZES else 'classifier'}-{img}px-b{batch}"
    model, flops = _build(arch, impl)
    model.eval()
    x = torch.randn(batch, 3, img, img, device=DEVICE)

    def step():
        with torch.inference_mode(), autocast(DTYPE):
            model(x)

    step()
    seconds = run(benchmark, step, calls=3 if CUDA else 1, rounds=10 if CUDA else None)
    extra = dict(arch=arch, impl=impl, batch=batch, img=img, patch=patch)
    if CUDA:
        peak_fl = peak_flops(torch.cuda.get_device_name(0))
        if peak_fl:
            extra["mfu"] = round(flops / 3 * batch / seconds / peak_fl, 4)
    annotate(benchmark, seconds, flops=flops / 3 * batch, images=batch, **extra)
