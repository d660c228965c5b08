"""CRATE-GPT against a transcription of crate-lm's two model files (tests/official_crate_gpt.py): parameter
counts, keys, initial weights, logits, loss and every gradient (float64 1e-10, fp32 1e-5) for every impl,
causality, generation with the tied KV cache, the intervention, and crate-lm's checkpoints."""
import math
import os
import sys

import pytest
import torch
from conftest import KERNEL_DEVICE
from harness import assert_rel
from official_crate_gpt import OvercompleteConfig, OvercompleteCRATE, SquareConfig, SquareCRATE
from tolerances import FP32_RTOL, FP64_RTOL

import crate_fast
from crate_fast import create_model, load_official_state_dict, to_official_state_dict
from crate_fast.checkpoint import identify
from crate_fast.models.crate_gpt import Intervention

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from _common import saved_activation_bytes  # noqa: E402  bench's: the storages autograd saves, parameters excluded

ORACLES = {"overcomplete": (OvercompleteConfig, OvercompleteCRATE), "square": (SquareConfig, SquareCRATE)}
TINY = dict(dim=32, depth=2, heads=4, vocab_size=97, block_size=16)
IMPLS = ("reference", "torch", "torch_recompute", "triton")   # *_recompute: that impl with recompute=True


def oracle(variant, dtype=torch.float32, **kw):
    sizes = {**TINY, **kw}
    config_cls, model_cls = ORACLES[variant]
    cfg = config_cls(block_size=sizes["block_size"], vocab_size=sizes["vocab_size"], n_layer=sizes["depth"],
                     n_head=sizes["heads"], n_embd=sizes["dim"])
    return model_cls(cfg).to(dtype)


def pair(variant, impl="torch", dtype=torch.float32, **kw):
    """(crate-lm's model, ours with its weights), both in dtype."""
    torch.manual_seed(0)
    off = oracle(variant, dtype, **kw)
    run = dict(impl=impl.removesuffix("_recompute"), recompute=impl.endswith("_recompute"))
    ours = create_model("crate_gpt_tiny", **{**TINY, **kw}, variant=variant, **run).to(dtype)
    load_official_state_dict(ours, off.state_dict())
    return off.eval(), ours.eval()


def tokens(batch=3, t=16, vocab=97, seed=1):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant,preset,count", [
    ("overcomplete", "crate_gpt_base", 81_934_848), ("square", "crate_gpt_base", 60_699_648),
    ("overcomplete", "crate_gpt_medium", 203_679_744), ("square", "crate_gpt_medium", 128_180_224)])
def test_parameter_counts_are_crate_lms(variant, preset, count):
    with torch.device("meta"):
        model = create_model(preset, variant=variant)
    assert sum(p.numel() for p in model.parameters()) == count               # the tied head counted once


@pytest.mark.parametrize("variant", sorted(ORACLES))
def test_keys_and_initial_weights_are_crate_lms(variant):
    torch.manual_seed(0)
    off = oracle(variant)
    torch.manual_seed(0)
    ours = create_model("crate_gpt_tiny", **TINY, variant=variant)
    official = to_official_state_dict(ours)
    theirs = {k: v for k, v in off.state_dict().items() if not k.endswith("attn.bias")}     # square's masks
    assert list(official) == list(theirs)
    for k, v in theirs.items():
        assert torch.equal(official[k], v), k                                 # one seed, crate-lm's weights
    assert ours.lm_head.weight is ours.wte.weight
    bound = math.sqrt(6 / TINY["dim"])
    assert all(b.ista.weight.abs().max() <= bound for b in ours.blocks)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", sorted(ORACLES))
@pytest.mark.parametrize("heads", [4, 1])
def test_logits_loss_and_every_gradient_in_float64(variant, impl, heads):
    if impl == "triton":
        pytest.skip("float64 has no Triton path: fp32 below")
    off, ours = pair(variant, impl, torch.float64, heads=heads)
    idx, targets = tokens(), tokens(seed=2)
    targets[0, :3] = -1                                                       # ignored positions
    logits_off, loss_off = off(idx, targets)
    logits, loss = ours(idx, targets)
    assert_rel(logits, logits_off, FP64_RTOL, "logits")
    assert_rel(loss, loss_off, FP64_RTOL, "loss")
    loss_off.backward()
    loss.backward()
    grads_off = dict(off.named_parameters())
    for name, p in ours.named_parameters():
        key = crate_fast.models.keys.official_key(ours, name)
        assert_rel(p.grad, grads_off[key].grad, FP64_RTOL, f"{impl} {name}")
    last, _ = off(idx)                                                        # crate-lm's inference path
    assert_rel(ours(idx)[0][:, -1:], last, FP64_RTOL, "last position")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", sorted(ORACLES))
def test_logits_and_loss_in_fp32(variant, impl):
    off, ours = pair(variant, impl)
    idx, targets = tokens(), tokens(seed=2)
    with torch.no_grad():
        logits_off, loss_off = off.double()(idx, targets)
        logits, loss = ours(idx, targets)
    assert_rel(logits, logits_off, FP32_RTOL, "logits")
    assert_rel(loss, loss_off, FP32_RTOL, "loss")


@pytest.mark.parametrize("impl", ["triton", "triton_recompute"])
def test_every_gradient_on_the_triton_path_in_fp32(impl):
    """impl="triton" (the interpreter on CPU), the tied D = D1 = W^T through the ODL op, with and without
    recompute: the loss and every parameter gradient as crate-lm's in float64, to the fp32 tolerance."""
    off, ours = pair("overcomplete", impl)
    idx, targets = tokens(), tokens(seed=2)
    off = off.double()
    _, loss_off = off(idx, targets)
    loss_off.backward()
    ours = ours.to(KERNEL_DEVICE)
    _, loss = ours(idx.to(KERNEL_DEVICE), targets.to(KERNEL_DEVICE))
    loss.backward()
    assert_rel(loss.detach().cpu(), loss_off.detach(), FP32_RTOL, "loss")
    grads_off = dict(off.named_parameters())
    for name, p in ours.named_parameters():
        key = crate_fast.models.keys.official_key(ours, name)
        assert_rel(p.grad.cpu(), grads_off[key].grad, FP32_RTOL, f"{impl} {name}")


def test_recompute_saves_about_half_of_crate_lms_activation_bytes():
    """The overcomplete model, impl="torch": per layer crate-lm's autograd saves 15 (B T d) tensors' worth;
    recompute=True saves 7 (LN inputs and outputs, w, the merged heads, the sparse coding's first residual)
    and the attention's row log-sum-exp, never a copy of a weight; the default keeps the probabilities and
    both codes for a faster step. Same loss either way, within rounding."""
    sizes = dict(dim=64, depth=4, heads=2, vocab_size=64, block_size=64)
    torch.manual_seed(0)
    off = oracle("overcomplete", **sizes)
    idx, targets = tokens(2, 64, 64), tokens(2, 64, 64, seed=2)
    theirs = saved_activation_bytes(lambda: off(idx, targets), list(off.parameters()))
    for recompute, most in ((True, 0.55), (False, 1.15)):
        ours = create_model("crate_gpt_tiny", **sizes, impl="torch", recompute=recompute)
        load_official_state_dict(ours, off.state_dict())
        assert saved_activation_bytes(lambda m=ours: m(idx, targets), list(ours.parameters())) <= most * theirs
        assert_rel(ours(idx, targets)[1].detach(), off(idx, targets)[1].detach())


@pytest.mark.parametrize("variant", sorted(ORACLES))
def test_causality_is_exact(variant):
    _, ours = pair(variant, "torch", torch.float64)
    idx = tokens(batch=2)
    for t in (1, 7, 15):
        changed = idx.clone()
        changed[:, t:] = (changed[:, t:] + 5) % TINY["vocab_size"]
        with torch.no_grad():
            assert torch.equal(ours(idx)[0][:, :t], ours(changed)[0][:, :t]), t


@pytest.mark.parametrize("variant", sorted(ORACLES))
@pytest.mark.parametrize("site", ["attn", "ista"])
def test_the_intervention_is_crate_lms(variant, site):
    off, ours = pair(variant, "torch", torch.float64)
    feature = 5 if site == "attn" else (4 * TINY["dim"] - 3 if variant == "overcomplete" else 7)
    spec = (feature, 2.5, 1, site if site == "attn" else "mlp")
    idx = tokens()
    with torch.no_grad():
        want, _ = off(idx, tokens(seed=2), enhanced_feature_id=spec)
        got, _ = ours(idx, enhanced_feature_id=spec)
        plain, _ = ours(idx)
        assert_rel(got, want, FP64_RTOL, "intervened logits")
        assert not torch.allclose(got, plain)
        assert torch.equal(got, ours(idx, enhanced_feature_id=Intervention(feature, 2.5, 1, site))[0])


@pytest.mark.parametrize("variant", sorted(ORACLES))
def test_generation_gives_crate_lms_tokens_with_the_tied_cache(variant):
    """A seeded run samples crate-lm's tokens (float64: the cached path rounds otherwise), through the
    window sliding past block_size; top_k and temperature as crate-lm's."""
    off, ours = pair(variant, "torch", torch.float64)
    prompt = tokens(batch=2, t=5)
    for kw in (dict(), dict(temperature=0.7, top_k=10)):
        torch.manual_seed(3)
        want, _ = off.generate(prompt, 20, **kw)                              # 25 tokens > block_size 16
        torch.manual_seed(3)
        got = ours.generate(prompt, 20, **kw)
        assert torch.equal(got, want), kw
    gen = torch.Generator().manual_seed(4)
    assert torch.equal(ours.generate(prompt, 6, generator=gen), ours.generate(prompt, 6, generator=gen.manual_seed(4)))


def test_cached_logits_equal_uncached_ones():
    _, ours = pair("overcomplete", "torch")
    idx = tokens(batch=2, t=12)
    with torch.no_grad():
        full = ours(idx)[0]
        cache = ours._cache_for(idx)
        steps = [ours._decode(idx[:, :4], cache, 0, None)] + [ours._decode(idx[:, i:i + 1], cache, i, None)
                                                             for i in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.w.shape[-2:] == (TINY["block_size"], TINY["dim"] // TINY["heads"])     # one w per token


def test_crate_lm_checkpoints_load_safely_and_strictly(tmp_path, caplog):
    """nanoGPT's container: {'model' (keys '_orig_mod.'-prefixed under torch.compile), 'optimizer', 'model_args',
    'iter_num', 'best_val_loss', 'config'}; the square model's causal-mask buffers are skipped by rule."""
    for variant in sorted(ORACLES):
        torch.manual_seed(0)
        off = oracle(variant, heads=2)
        opt = torch.optim.AdamW(off.parameters())
        off(tokens(), tokens(seed=2))[1].backward()
        opt.step()
        args = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=97, dropout=0.0)
        path = tmp_path / f"ckpt-{variant}.pt"
        torch.save({"model": {f"_orig_mod.{k}": v for k, v in off.state_dict().items()},
                    "optimizer": opt.state_dict(), "model_args": args, "iter_num": 1,
                    "best_val_loss": torch.tensor(3.0), "config": {"batch_size": 12}}, path)
        model = crate_fast.load_model(str(path))                               # the model_args name the model
        assert model.config.variant == variant and model.config.heads == 2
        for k, v in off.state_dict().items():
            if not k.endswith("attn.bias"):
                assert torch.equal(to_official_state_dict(model)[k], v), k
        assert ("attn.bias" in caplog.text) == (variant == "square")
        caplog.clear()
        with pytest.raises(ValueError, match="n_head=2"):
            load_official_state_dict(create_model("crate_gpt_tiny", **TINY, variant=variant), str(path))
        crate_fast.save_weights(model, tmp_path / f"{variant}.safetensors")   # the tied tensor stored once
        again = crate_fast.load_model(str(tmp_path / f"{variant}.safetensors"))
        assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
        assert again.lm_head.weight is again.wte.weight


def test_the_released_checkpoint_is_known():
    with torch.device("meta"):
        sd = to_official_state_dict(create_model("crate_gpt_base"))
    assert identify(sd).name == "crate_gpt_base_pile"
    assert len(sd) == 101 and sd["transformer.h.0.ista.weight"].shape == (3072, 768)
