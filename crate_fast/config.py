"""Validation helpers and the patch-grid properties shared by every model family's frozen config
dataclass (models/*.py).

Each config validates itself once, in ``__post_init__``, and raises ValueError naming the field."""
from __future__ import annotations

import dataclasses
from typing import Any, Union

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


class PatchGridConfig:
    """What a config with img_size, patch_size (pairs) and in_chans derives: the patch grid, the patch
    count and size, and the dataclass conveniences. A mixin for the families' frozen dataclasses."""

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.patch_size[0] * self.patch_size[1]

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
