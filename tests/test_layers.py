"""The public layers work inside other models (users import them into their own architectures)."""
import pytest
import torch
from harness import assert_rel
from torch import nn

from crate_fast.kernels import mssa_attention_ref
from crate_fast.layers import ISTA, MSSA, ODL, CRATEBlock


def _train(model, x, y, steps=8, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_timm_vit_with_mssa_and_ista_trains(impl):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            embed_dim=96, depth=2, num_heads=2, num_classes=4)
    for blk in vit.blocks:
        blk.attn = MSSA(96, heads=2, impl=impl)     # timm passes attn_mask=None, is_causal=False
        blk.mlp = ISTA(96, impl=impl)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    losses = _train(vit, x, y)
    assert losses[-1] < losses[0] * 0.7, losses
    for blk in vit.blocks:
        assert blk.attn.qkv.weight.grad is not None and blk.mlp.weight.grad.abs().sum() > 0


def test_crate_blocks_in_a_custom_sequence_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 64), CRATEBlock(64, heads=4, dim_head=16), CRATEBlock(64, heads=4),
                          nn.Flatten(), nn.Linear(64 * 7, 3))
    x, y = torch.randn(5, 7, 10), torch.tensor([0, 1, 2, 0, 1])
    losses = _train(model, x, y)
    assert losses[-1] < losses[0] * 0.7, losses


def test_mssa_rejects_masks_and_explains():
    m = MSSA(32, heads=2)
    with pytest.raises(NotImplementedError, match="attention mask.*is_causal"):
        m(torch.randn(1, 5, 32), attn_mask=torch.ones(5, 5, dtype=torch.bool))


@pytest.mark.parametrize("impl", ["reference", "torch"])
def test_mssa_is_causal(impl):
    """is_causal=True: per head softmax(w w^T * scale) under the causal mask, then the output
    projection; later tokens never move an earlier output, and the dropout path is causal too."""
    torch.manual_seed(0)
    m = MSSA(32, heads=2, impl=impl).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    w = m.project(x)
    want = m.out(mssa_attention_ref(w, m.scale, causal=True).transpose(1, 2).reshape(2, 7, 32))
    assert_rel(m(x, is_causal=True), want, 1e-12)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 3, 32, dtype=torch.float64)
    assert torch.equal(m(x2, is_causal=True)[:, :4], m(x, is_causal=True)[:, :4])
    assert not torch.allclose(m(x, is_causal=True), m(x))
    drop = MSSA(32, heads=2, dropout=0.5, impl=impl).double().train()
    drop.load_state_dict(m.state_dict())
    torch.manual_seed(1)
    a = drop(x, is_causal=True)
    torch.manual_seed(1)
    b = drop(x2, is_causal=True)
    assert torch.equal(a[:, :4], b[:, :4])                           # same dropout draws, causal probabilities


@pytest.mark.parametrize("recompute", [False, True])
def test_odl_layer_passes_recompute(recompute):
    """ODL(recompute=...) reaches odl_step: the same output and gradients, and the activation bytes saved
    for the backward: x and e with recompute, x, a1, e and a2 without (torch_ops.py)."""
    torch.manual_seed(0)
    layer = ODL(16, recompute=recompute, impl="torch")
    ref = ODL(16, impl="reference")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(3, 5, 16, requires_grad=True)
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        out = layer(x)
    out.sum().backward()
    want = ref(x.detach())
    assert_rel(out.detach(), want.detach())
    activations = sum(n for n in sizes if n not in (16 * 64,))        # the dictionaries excluded
    assert activations == 15 * (2 * 16 if recompute else 2 * (16 + 64))
    assert f"recompute={recompute}" in repr(layer)


def test_layer_impl_validation_and_repr():
    with pytest.raises(ValueError, match="impl must be"):
        ISTA(8, impl="gpu")
    assert "dim_head=48" in repr(MSSA(96, heads=2))
    blk = CRATEBlock(32, heads=2, impl="reference")
    blk.set_impl("torch")
    assert blk.attn.impl == blk.ista.impl == "torch"
