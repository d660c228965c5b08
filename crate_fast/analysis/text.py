"""The white-box analysis of a language model (CRATE-GPT) on a text: per-layer coding rate and sparsity of
its codes (stats.layer_stats on the token ids) and the causal attention of every position
(attention.token_attention), with the pictures and stats.json the command line writes."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from ..registry import family_of_config
from .attention import check_heads, check_layer, token_attention
from .plots import plot_curve, plot_token_attention
from .stats import layer_stats
from .tokens import check_model, sparse_code_name


def analyze_text(model: nn.Module, idx: torch.Tensor, labels: list[str], out: str, *, layer: int = -1,
                 heads: list[int] | None = None) -> dict:
    """Compute the statistics of a text and write stats.json, coding_rate.png, sparsity.png and
    attention.png (every head's causal attention at `layer`) into `out`. Returns stats.json's content.

    idx: (1, T) token ids, T <= block_size; labels: T strings naming the tokens on the picture's axes.
    Raises TypeError for a model that does not read tokens, ValueError for a bad layer, head, or a text
    longer than the model's context (before any work)."""
    check_model(model, "tokens")
    layer, heads = check_layer(model, layer), check_heads(model, heads)
    if idx.dim() != 2 or idx.shape[0] != 1 or not 0 < idx.shape[1] <= model.config.block_size or \
            len(labels) != idx.shape[1]:
        raise ValueError(f"expected one text of 1..{model.config.block_size} tokens (1, T) with T labels, got "
                         f"{tuple(idx.shape)} and {len(labels)} labels")
    os.makedirs(out, exist_ok=True)
    model = model.eval()
    stats, codes = layer_stats(model, idx), sparse_code_name(model)
    plot_curve(stats, "coding_rate", "coding rate $R^c$", os.path.join(out, "coding_rate.png"),
               "compression: $R^c$ of each layer's input (one text)")
    plot_curve(stats, "l0", "normalized $\\ell_0$ (1 - sparsity)", os.path.join(out, "sparsity.png"),
               f"sparsification: {codes} $\\ell_0$")
    maps = token_attention(model, idx, layer, heads)[0]                       # (heads, T, T)
    plot_token_attention(maps.cpu().numpy(), labels, os.path.join(out, "attention.png"),
                         f"causal attention per head, layer {layer + 1}", heads)
    result = {"family": family_of_config(model.config).name, "layers": stats, "sparsity_of": codes,
              "num_tokens": int(idx.shape[1]), "attention_layer": layer, "attention_heads": heads,
              "tokens": labels, "config": model.config.to_dict()}
    with open(os.path.join(out, "stats.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
