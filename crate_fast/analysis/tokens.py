"""How the white-box analysis reads a model of any family: the tokens entering its first (encoder) block,
and what each block's sparse-coding step outputs.

    every family         model.embed(images, pos_interp): patches after CLS, plus the position table (the
                         learned one of CRATE and CRATE-alpha; CRATE-MAE's decoder_pos_embed, the fixed
                         sin-cos table its official encoder adds: the tokens forward_features feeds its
                         blocks, mask ratio 0); CRATE-MAE's ``model.norm`` follows the last block
    sparse codes         each block's ``sparsify`` (crate_fast.layers.Block): CRATEBlock (CRATE, CRATE-MAE's
                         encoder) the ISTA output, which is the next layer's input; CRATEAlphaBlock the ODL
                         codes a2 of LN2(z_half), not the block's output (z_half + a2 D1^T: dense)
Off the training grid the position table is resized by `pos_interp`: "dino" (DINO's
interpolate_pos_encoding, what the CRATE notebooks and CRATE-MAE's forward_features use) or "size"
(F.interpolate(size=...), what the classifiers' forward uses); crate_fast.layers.resample_pos_embed.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..models.base import CRATEModel
from ..registry import family_of_config

POS_INTERPS = ("dino", "size")


def check_model(model: nn.Module, inputs: str | None = None) -> None:
    """TypeError unless `model` is a crate_fast model the analysis reads (CRATE, CRATE-alpha, CRATE-MAE,
    CRATE-GPT: a registered family whose blocks ``compress`` and ``sparsify``) and, when `inputs` is given,
    one that reads those inputs ("images" or "tokens")."""
    ok = isinstance(model, CRATEModel) and hasattr(model.blocks[0], "sparsify") and \
        (inputs is None or family_of_config(model.config).inputs == inputs)
    if not ok:
        what = {"images": "CRATE, CRATE-alpha and CRATE-MAE", "tokens": "CRATE-GPT"}.get(
            inputs, "CRATE, CRATE-alpha, CRATE-MAE and CRATE-GPT")
        raise TypeError(f"the white-box analysis reads {what} models here, got {type(model).__name__}")


def reads_tokens(model: nn.Module) -> bool:
    """Whether the model reads token ids (a language model) rather than images."""
    return family_of_config(model.config).inputs == "tokens"


def check_pos_interp(pos_interp: str) -> str:
    """`pos_interp` if it is "dino" or "size"; ValueError otherwise."""
    if pos_interp not in POS_INTERPS:
        raise ValueError(f"pos_interp must be 'dino' or 'size', got {pos_interp!r}")
    return pos_interp


def float_model(model: nn.Module) -> nn.Module:
    """The model itself when every parameter is fp32, else an fp32 copy (the analysis runs in fp32)."""
    if all(p.dtype == torch.float32 for p in model.parameters()):
        return model
    return copy.deepcopy(model).float()


def embed_tokens(model: nn.Module, inputs: torch.Tensor, pos_interp: str = "dino") -> torch.Tensor:
    """The tokens entering the first (encoder) block: (B, C, H, W) images -> (B, 1 + H/p * W/p, dim), CLS
    first, in the dtype of the model and images (H and W: any multiple of the patch); for a language
    model (B, T) token ids -> (B, T, dim) token + position embeddings (pos_interp does not apply).

    For CRATE-MAE with pos_interp="dino" this is exactly what forward_features feeds its blocks (at the
    config's size also forward_encoder's tokens at mask ratio 0: every patch, none replaced by the mask
    token). Raises ValueError for a bad pos_interp or input size, TypeError for another model."""
    check_model(model)
    check_pos_interp(pos_interp)
    return model.embed(inputs) if reads_tokens(model) else model.embed(inputs, pos_interp=pos_interp)


def sparse_code_name(model: nn.Module) -> str:
    """What layer_stats' sparsity counts the zeros of, for labels: "ISTA output" or "ODL codes a2"."""
    check_model(model)
    return model.blocks[0].codes_name
