"""Validation helpers shared by every model family's frozen config dataclass (models/*.py).

Each config validates itself once, in ``__post_init__``, and raises ValueError naming the field."""
from __future__ import annotations

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
