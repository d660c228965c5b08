"""CRATE-GPT speed: the training step (forward + backward + AdamW) in tokens/s, MFU and saved activations,
and decoding in tokens/s, every provider side by side:

    crate_lm    crate-lm's own modules (tests/official_crate_gpt.py, the transcription the tests check
                against): its overcomplete MLP runs 5 GEMMs forward (x W^T twice), SDPA causal attention
    reference   crate_fast impl="reference" (the literal math, 4 GEMMs, masked-softmax attention)
    torch       impl="torch" (hand-written backward passes); triton (GPU), compile (regional: each block)
    recompute   recompute=True (the attention's probabilities and the sparse codes recomputed in the
                backward: the memory-lean step) with impl="torch" on CPU, impl="triton" on a GPU
    checkpointing   impl="torch" with gradient checkpointing (each block recomputed in the backward)
    gpt2        nanoGPT's GPT-2 at the same width and depth (bench/_gpt2.py), what users would otherwise pick

GPU: crate_gpt_base (12 / 12 / 768, vocab 50304), T = 1024, batch 8, bf16. CPU: the overcomplete model at
width 256, depth 4, 4 heads, vocab 512, T = 256, batch 8, fp32: ratios only. Decoding: a prompt of 512
tokens extended by 32, crate-lm's generate (the whole context every step) against the tied KV cache.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch
from _common import CUDA, DEVICE, annotate, autocast, run, saved_activation_bytes, sync
from _gpt2 import GPT2

from crate_fast import create_model, load_official_state_dict
from crate_fast.flops import flops_per_sample, peak_flops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from official_crate_gpt import OvercompleteConfig, OvercompleteCRATE  # noqa: E402

if CUDA:
    SIZE, T, BATCH, DTYPE = dict(dim=768, depth=12, heads=12, vocab_size=50304), 1024, 8, torch.bfloat16
    PROVIDERS = ["crate_lm", "reference", "torch", "recompute", "triton", "compile", "checkpointing", "gpt2"]
else:
    SIZE, T, BATCH, DTYPE = dict(dim=256, depth=4, heads=4, vocab_size=512), 256, 8, torch.float32
    PROVIDERS = ["crate_lm", "reference", "torch", "recompute", "compile", "checkpointing", "gpt2"]
PROMPT, NEW = 512, 32


def _build(provider: str, block_size: int = T):
    """(model, its loss function idx, targets -> loss)."""
    torch.manual_seed(0)
    cfg = OvercompleteConfig(block_size=block_size, vocab_size=SIZE["vocab_size"], n_layer=SIZE["depth"],
                             n_head=SIZE["heads"], n_embd=SIZE["dim"])
    if provider == "gpt2":
        model = GPT2(**SIZE, block_size=block_size)
    elif provider == "crate_lm":
        model = OvercompleteCRATE(cfg)
    else:
        # recompute: on the torch path on CPU; on a GPU with the Triton kernels (whose attention keeps no P)
        impl = {"compile": "torch", "checkpointing": "torch", "recompute": "triton" if CUDA else "torch"}.get(
            provider, provider)
        model = create_model("crate_gpt_base", **SIZE, block_size=block_size, impl=impl,
                             recompute=provider == "recompute")
        load_official_state_dict(model, OvercompleteCRATE(cfg).state_dict())
        if provider == "compile":
            for blk in model.blocks:                  # regional compile, as train.py --compile
                blk.compile()
        if provider == "checkpointing":
            model.set_grad_checkpointing()
    return model.to(DEVICE)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_gpt_train_step(benchmark, provider):
    benchmark.group = f"gpt-train-d{SIZE['dim']}-L{SIZE['depth']}-T{T}-b{BATCH}"
    model = _build(provider)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    idx = torch.randint(0, SIZE["vocab_size"], (BATCH, T), device=DEVICE)
    targets = torch.randint(0, SIZE["vocab_size"], (BATCH, T), device=DEVICE)

    def loss():
        with autocast(DTYPE):
            return model(idx, targets)[1]

    def step():
        loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    sync()
    activations = saved_activation_bytes(loss, params=list(model.parameters())) if provider != "compile" else None
    seconds = run(benchmark, step, rounds=10 if CUDA else 5)
    per_token = flops_per_sample(create_model("crate_gpt_base", **SIZE, block_size=T).config, training=True)
    extra = dict(provider=provider, batch=BATCH, seq=T, tokens_per_s=round(BATCH * T / seconds, 1), **SIZE)
    if activations is not None:
        extra["activation_mb"] = round(activations / 2**20, 1)
    if CUDA and provider != "gpt2" and peak_flops(torch.cuda.get_device_name(0)):
        extra["mfu"] = round(per_token * BATCH * T / seconds / peak_flops(torch.cuda.get_device_name(0)), 4)
    annotate(benchmark, seconds, flops=per_token * BATCH * T if provider != "gpt2" else None, **extra)


@pytest.mark.parametrize("provider", ["crate_lm", "torch"])
def test_gpt_decode(benchmark, provider):
    """Tokens/s extending a 512-token prompt by 32 (greedy-equivalent: top_k 1)."""
    benchmark.group = f"gpt-decode-d{SIZE['dim']}-L{SIZE['depth']}-prompt{PROMPT}"
    model = _build(provider, block_size=PROMPT + NEW).eval()
    prompt = torch.randint(0, SIZE["vocab_size"], (1, PROMPT), device=DEVICE)

    def decode():
        with torch.no_grad(), autocast(DTYPE):
            model.generate(prompt, NEW, top_k=1)

    seconds = run(benchmark, decode, rounds=5 if CUDA else 3, warmup=1)
    annotate(benchmark, seconds, provider=provider, prompt=PROMPT, new_tokens=NEW,
             tokens_per_s=round(NEW / seconds, 1), **SIZE)
