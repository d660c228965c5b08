"""What every model family's frozen config dataclass shares: validation helpers, the dataclass
conveniences (:class:`ConfigBase`) and, for image models, the patch grid (:class:`PatchGridConfig`).

Each config validates itself once, in ``__post_init__``, and raises ValueError naming the field."""
from __future__ import annotations

import dataclasses
from typing import Any, Union

from crate_fast.kernels import check_impl

Size = Union[int, tuple[int, int]]


def to_2tuple(v: Size, name: str) -> tuple[int, int]:
    """An int or a pair of positive ints -> (h, w). Raises ValueError otherwise."""
    if isinstance(v, int):
        v = (v, v)
    v = tuple(v)
    if len(v) != 2 or not all(isinstance(i, int) and i > 0 for i in v):
        raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {v!r}")
    return v


def check_positive(cfg: Any, *names: str) -> None:
    """Each named field is a positive int."""
    for name in names:
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def check_dropout(cfg: Any, *names: str) -> None:
    """Each named field is a probability in [0, 1)."""
    for name in names:
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {getattr(cfg, name)}")


class ConfigBase:
    """The dataclass conveniences of every family's frozen config."""

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        """The config of a dict made by to_dict (a JSON round trip included: lists become tuples again in
        validation). Raises TypeError for a field the family does not have, ValueError for a bad value."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown {cls.__name__} field(s) {sorted(unknown)}")
        return cls(**values)


class PatchGridConfig(ConfigBase):
    """An image model's config: img_size, patch_size (pairs after validation), in_chans, dim, depth, heads,
    dim_head (default dim // heads), impl. Derives the patch grid, the patch count and size.
    A mixin for the families' frozen dataclasses, whose __post_init__ calls :meth:`_check_tokens`."""

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.patch_size[0] * self.patch_size[1]

    def _check_tokens(self, *positive: str) -> None:
        """Normalize img_size / patch_size to pairs and dim_head to its default, then check the fields
        every image family has (and `positive`, more int fields > 0). Raises ValueError."""
        set_ = object.__setattr__  # frozen: normalize fields once, here
        set_(self, "img_size", to_2tuple(self.img_size, "img_size"))
        set_(self, "patch_size", to_2tuple(self.patch_size, "patch_size"))
        check_positive(self, "dim", "depth", "heads", "in_chans", *positive)
        if self.dim_head is None:
            if self.dim % self.heads:
                raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}; pass dim_head")
            set_(self, "dim_head", self.dim // self.heads)
        check_positive(self, "dim_head")
        for (i, p) in zip(self.img_size, self.patch_size, strict=True):
            if i % p:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        check_impl(self.impl)
