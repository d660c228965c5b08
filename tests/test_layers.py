"""The public layers work inside other models (users import them into their own architectures)."""
import pytest
import torch
from torch import nn

from crate_fast.layers import ISTA, MSSA, CRATEBlock


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
    with pytest.raises(NotImplementedError, match="masks"):
        m(torch.randn(1, 5, 32), attn_mask=torch.ones(5, 5, dtype=torch.bool))


def test_layer_impl_validation_and_repr():
    with pytest.raises(ValueError, match="impl must be"):
        ISTA(8, impl="gpu")
    assert "dim_head=48" in repr(MSSA(96, heads=2))
    blk = CRATEBlock(32, heads=2, impl="reference")
    blk.set_impl("torch")
    assert blk.attn.impl == blk.ista.impl == "torch"
