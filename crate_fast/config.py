"""CRATE configuration: one frozen dataclass, validated once, no global flags."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Union

from crate_fast.kernels._utils import IMPLS

POOLS = ("cls", "mean")

Size = Union[int, tuple[int, int]]


def to_2tuple(v: Size, name: str) -> tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) and i > 0 for i in v):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return v


@dataclass(frozen=True)
class CRATEConfig:
    """Everything that defines a CRATE classifier (official ``model/crate.py`` argument names in brackets).

    dim_head defaults to dim // heads, as in every official preset (CRATE-S: 576 / 12 = 48).
    step_size [ista] is the ISTA step eta; lambd the sparsity weight (a constant 0.1 in the official code).
    dropout is the attention and output-projection dropout, emb_dropout the one after the embedding.
    impl picks the math for MSSA and ISTA ("reference", "torch", "triton", "auto"); it never changes
    parameters, so a state_dict moves freely between impls.
    """

    dim: int
    depth: int
    heads: int
    dim_head: int | None = None
    img_size: Size = 224
    patch_size: Size = 16
    in_chans: int = 3
    num_classes: int = 1000
    pool: str = "cls"
    step_size: float = 0.1
    lambd: float = 0.1
    dropout: float = 0.0
    emb_dropout: float = 0.0
    impl: str = "auto"

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalize fields once, here
        set_(self, "img_size", to_2tuple(self.img_size, "img_size"))
        set_(self, "patch_size", to_2tuple(self.patch_size, "patch_size"))
        for name in ("dim", "depth", "heads", "in_chans", "num_classes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if self.dim_head is None:
            if self.dim % self.heads:
                raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}; pass dim_head")
            set_(self, "dim_head", self.dim // self.heads)
        if self.dim_head <= 0:
            raise ValueError(f"dim_head must be positive, got {self.dim_head}")
        for (i, p) in zip(self.img_size, self.patch_size):
            if i % p:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")
        for name in ("dropout", "emb_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.step_size <= 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.patch_size[0] * self.patch_size[1]

    def replace(self, **changes: Any) -> CRATEConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
