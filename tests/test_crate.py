"""Whole-model parity: every impl computes the reference model's function, with the same parameters."""
import pytest
import torch
from conftest import KERNEL_DEVICE
from harness import assert_2x_rule, assert_rel
from tolerances import FP64_RTOL

from crate_fast import create_model

# Small CRATE: head dims 48 (CRATE-S) and 64, 17 or 65 tokens, odd batch.
SMALL = [dict(dim=96, heads=2, img_size=16, patch_size=4),    # dim_head 48, N = 17
         dict(dim=128, heads=2, img_size=32, patch_size=4)]   # dim_head 64, N = 65


def small_model(cfg, impl, depth=2, **kw):
    torch.manual_seed(1)
    return create_model("crate_tiny", num_classes=5, depth=depth, impl=impl, **cfg, **kw)


def images(cfg, batch=3, dtype=torch.float32):
    return torch.randn(batch, 3, cfg["img_size"], cfg["img_size"], dtype=dtype)


@pytest.mark.parametrize("cfg", SMALL, ids=["d48", "d64"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_torch_impl_logits_fp32(cfg, pool):
    x = images(cfg)
    truth = small_model(cfg, "reference", pool=pool).double()(x.double())
    for impl in ("reference", "torch"):
        assert_rel(small_model(cfg, impl, pool=pool)(x), truth, what=impl)


@pytest.mark.parametrize("cfg", SMALL, ids=["d48", "d64"])
def test_torch_impl_gradients_float64(cfg):
    """Every parameter gradient, float64 (ReLU kinks make fp32 gradient parity ill-posed, docs/DESIGN.md §5)."""
    x = images(cfg, dtype=torch.float64)
    grads = {}
    for impl in ("reference", "torch"):
        m = small_model(cfg, impl).double()
        logits = m(x)
        (logits * torch.randn(logits.shape, generator=torch.Generator().manual_seed(2),
                              dtype=torch.float64)).sum().backward()
        grads[impl] = {n: p.grad for n, p in m.named_parameters()}
    assert grads["reference"].keys() == grads["torch"].keys()
    for n, g in grads["reference"].items():
        assert g is not None and g.abs().max() > 0, n
        assert_rel(grads["torch"][n], g, FP64_RTOL, n)


@pytest.mark.parametrize("cfg", SMALL, ids=["d48", "d64"])
def test_torch_impl_bf16_autocast(cfg):
    x = images(cfg)
    truth = small_model(cfg, "reference").double()(x.double())
    out = {}
    for impl in ("reference", "torch"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out[impl] = small_model(cfg, impl)(x)
        assert out[impl].dtype == torch.bfloat16
    assert_2x_rule(out["torch"], out["reference"], truth, what="logits")


def test_triton_impl_logits_fp32():
    cfg = SMALL[0]
    x = images(cfg, batch=1)
    truth = small_model(cfg, "reference", depth=1).double()(x.double())
    m = small_model(cfg, "triton", depth=1).to(KERNEL_DEVICE)
    assert_rel(m(x.to(KERNEL_DEVICE)).cpu(), truth, what="triton")


def test_same_seed_same_init_as_official():
    from official_crate import OfficialCRATE

    from crate_fast import to_official_state_dict
    torch.manual_seed(3)
    off = OfficialCRATE(image_size=16, patch_size=4, num_classes=5, dim=96, depth=2, heads=2, dim_head=48)
    torch.manual_seed(3)
    ours = create_model("crate_tiny", num_classes=5, depth=2, dim=96, heads=2, img_size=16, patch_size=4)
    ref = off.state_dict()
    for k, v in to_official_state_dict(ours).items():
        assert torch.equal(v, ref[k]), k


def test_pos_embed_interpolation_at_forward():
    m = small_model(SMALL[1], "torch")
    out = m(torch.randn(2, 3, 48, 40))          # 12 x 10 grid instead of 8 x 8
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    table = m.pos_embed_for((8, 8))
    assert table is m.pos_embed                 # the config's own grid uses the table as is
    big = m.pos_embed_for((12, 10))
    assert big.shape == (1, 121, 128) and torch.equal(big[:, 0], m.pos_embed[:, 0])


def test_dropout_training_uses_reference_attention_and_eval_is_deterministic():
    m = small_model(SMALL[0], "torch", dropout=0.5, emb_dropout=0.1)
    x = images(SMALL[0])
    m.train()
    a, b = m(x), m(x)
    assert not torch.allclose(a, b)
    m.eval()
    assert torch.equal(m(x), m(x))
