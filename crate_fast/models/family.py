"""What a model family is, in one place: the bundle each family file declares beside its config (like
torchtitan's ModelSpec) and crate_fast.registry collects. Everything outside models/ that needs a
family-specific fact (FLOPs, the training objective, which train.py flags apply, what the inputs are,
whether timm serves it) reads it here instead of switching on types.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

OBJECTIVES = ("classification", "masked_autoencoding", "language_modeling")
INPUTS = ("images", "tokens")


@dataclass(frozen=True)
class Family:
    """One model family.

    name: the registry key ("crate"); title: for messages ("CRATE"); paper: where the math comes from.
    config_class / model_class: the frozen config dataclass and the nn.Module built from it.
    presets: {preset name: config fields}, the names create_model takes.
    flops: flops(config, training) -> matmul FLOPs of one sample (an image; a token, in a context of
        block_size, for token models) forward, or forward + backward with training=True (§6).
    objective: what train.py optimizes (one of OBJECTIVES; crate_fast.training.objectives).
    inputs: "images" (B, C, H, W) floats or "tokens" (B, T) int64 ids.
    train_fields: the train.py flags that set fields of this config (a flag outside them is refused for
        this family unless left at its default).
    timm: served to timm.create_model (image classifiers).
    config_from_file: config_from_file(weights, impl) -> the config of the model a file in the family's
        own official format describes (crate_fast.io.Weights: e.g. nanoGPT's model_args), or None when
        the file is not one; crate_fast.load_model asks it before the generic rules.
    """

    name: str
    title: str
    paper: str
    config_class: type
    model_class: type
    presets: dict[str, dict]
    flops: Callable[..., int]
    objective: str
    inputs: str = "images"
    train_fields: tuple[str, ...] = field(default=())
    timm: bool = False
    config_from_file: Callable | None = None

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {INPUTS}, got {self.inputs!r}")
