"""Test oracle: the official CRATE-alpha PyTorch port's module tree and math, transcribed for the tests.

Mirrors UCSC-VLAA/CRATE-alpha ``torch_inference/model/crate_alpha.py`` @edbd624 (docs/DESIGN.md §2.2):
same module nesting (so the same state_dict keys), same parameter creation order, same operations
(the port's einsums written as matmuls), LayerNorm eps 1e-6 in the blocks and the default 1e-5 before
the head. Written without einops. It is never imported by the package.
"""
import torch
import torch.nn.functional as F
from torch import nn


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.norm(x))


class OvercompleteISTABlock(nn.Module):
    def __init__(self, d, overcomplete_ratio=4, eta=0.1, lmbda=0.1):
        super().__init__()
        self.eta, self.lmbda = eta, lmbda
        self.D = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, overcomplete_ratio * d)))
        self.D1 = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(d, overcomplete_ratio * d)))

    def forward(self, x):
        negative_lasso_grad = torch.matmul(x, self.D)                       # einsum "pd,nlp->nld"
        z1 = F.relu(self.eta * negative_lasso_grad - self.eta * self.lmbda)
        Dz1 = torch.matmul(z1, self.D.t())                                  # einsum "dp,nlp->nld"
        lasso_grad = torch.matmul(Dz1 - x, self.D)
        z2 = F.relu(z1 - self.eta * lasso_grad - self.eta * self.lmbda)
        return torch.matmul(z2, self.D1.t())


class Attention(nn.Module):
    def __init__(self, dim, heads, dim_head):
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.qkv = nn.Linear(dim, inner_dim, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, dim, bias=False), nn.Dropout(0.0)) if project_out \
            else nn.Identity()

    def forward(self, x):
        b, n, _ = x.shape
        w = self.qkv(x).reshape(b, n, self.heads, -1).permute(0, 2, 1, 3)      # b h n d
        dots = torch.matmul(w, w.transpose(-1, -2)) * self.scale
        attn = dots.softmax(dim=-1)
        out = torch.matmul(attn, w)
        out = out.permute(0, 2, 1, 3).reshape(b, n, -1)                          # b n (h d)
        return self.to_out(out)


class Transformer(nn.Module):
    def __init__(self, dim, depth, heads, dim_head):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head)), PreNorm(dim, OvercompleteISTABlock(dim))])
            for _ in range(depth)
        ])

    def forward(self, x):
        for attn, ff in self.layers:
            x = attn(x) + x
            x = ff(x) + x
        return x


class OfficialCRATEAlpha(nn.Module):
    def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, dim_head=64):
        super().__init__()
        num_patches = (image_size // patch_size) ** 2
        self.conv1 = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size, bias=True, padding="valid")
        self.pos_embedding = nn.Parameter(torch.randn(1, num_patches + 1, dim))
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.transformer = Transformer(dim, depth, heads, dim_head)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, img):
        x = self.conv1(img)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        b, n, _ = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.pos_embedding[:, :(n + 1)]
        x = self.transformer(x)
        return self.mlp_head(x[:, 0])


def official_base(image_size=224, patch_size=16, num_classes=1000):
    """The port's CRATE_base (768 / 12 heads / 12 layers; /16 at 224 px)."""
    return OfficialCRATEAlpha(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=768,
                              depth=12, heads=12, dim_head=64)


def official_large(image_size=224, patch_size=14, num_classes=1000):
    """The port's CRATE_large (1024 / 16 heads / 24 layers; /14 at 224 px)."""
    return OfficialCRATEAlpha(image_size=image_size, patch_size=patch_size, num_classes=num_classes, dim=1024,
                              depth=24, heads=16, dim_head=64)
