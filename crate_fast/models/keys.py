"""Official key layouts: the vocabulary that translates crate-fast parameter names to a family's official
ones and back. Each model family declares its map as the class attribute ``official_keys``; the loader
(crate_fast.checkpoint) reads it. Like torchtitan's state-dict adapters, it sits below the models.
"""
from __future__ import annotations

import re

from torch import nn


class KeyMap:
    """crate_fast parameter names <-> a family's official names.

    top: renames of whole keys or of key prefixes (ending in '.'); blocks: for each of our block lists
    (e.g. 'blocks.'), the official list prefix and the renames inside one block.
    """

    def __init__(self, top: dict[str, str], blocks: dict[str, tuple[str, dict[str, str]]]):
        self.top, self.blocks = top, blocks
        # the same renames read backwards, built once (from_official runs for every key of a file)
        self._top_inv = {v: k for k, v in top.items()}
        self._blocks_inv = {dst: (src, {v: k for k, v in inner.items()}) for src, (dst, inner) in blocks.items()}

    @staticmethod
    def _rename(key: str, top: dict[str, str], blocks: dict[str, tuple[str, dict[str, str]]]) -> str | None:
        for src_list, (dst_list, inner) in blocks.items():
            m = re.match(re.escape(src_list) + r"(\d+)\.(.*)$", key)
            if m:
                idx, rest = m.groups()
                for src, dst in inner.items():
                    if rest.startswith(src):
                        return f"{dst_list}{idx}.{dst}{rest[len(src):]}"
                return None
        for src, dst in top.items():
            if key == src or (src.endswith(".") and key.startswith(src)):
                return dst + key[len(src):]
        return None

    def to_official(self, key: str) -> str | None:
        """Our name -> the official one (None if it has no official counterpart)."""
        return self._rename(key, self.top, self.blocks)

    def from_official(self, key: str) -> str | None:
        """Official name -> ours (None if unknown)."""
        return self._rename(key, self._top_inv, self._blocks_inv)


def key_map(model: nn.Module) -> KeyMap:
    """The model's official key layout. Raises TypeError for a model without one."""
    keys = getattr(model, "official_keys", None)
    if keys is None:
        raise TypeError(f"{type(model).__name__} has no official key layout (official_keys)")
    return keys


def official_key(model: nn.Module, key: str) -> str | None:
    """The official name of one of the model's parameters (None if it has none)."""
    return key_map(model).to_official(key)


def crate_fast_key(model: nn.Module, key: str) -> str | None:
    """The model's name for an official parameter name (None if unknown)."""
    return key_map(model).from_official(key)
