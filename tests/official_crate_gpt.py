"""Test oracle: crate-lm's two CRATE-GPT language models, transcribed for the tests.

Mirrors crate-lm/crate-lm @3d5027b (3d5027b7471b7586c76c24063d19bbc5c545b74a):

- ``crate.py`` (unchanged since 4df2644) -> SquareConfig / SquareCRATE: the square ISTA step
  relu(v + eta (v W - v W^T W) - eta lambda), W (d, d), no residual around it; causal attention by the manual
  masked softmax (``flash = False``) over a registered, persistent tril buffer ``attn.bias`` (1, 1, T, T);
  no final LayerNorm.
- ``crate_overcomplete.py`` -> OvercompleteConfig / OvercompleteCRATE (the released weights): two ISTA steps
  from a zero code with a tied 4d-atom dictionary W (4d, d), output a2 W, no residual; causal attention by
  SDPA ``is_causal=True`` with the ``y_hook`` identity after the heads are reassembled; final LayerNorm ``ln_f``.

Same module nesting and attribute names (so the same state_dict keys, ``lm_head.weight`` tied to
``transformer.wte.weight``), the same parameter creation order and init (so one seed gives crate-lm's initial
weights), the same operations in the same order, the same ``enhanced_feature_id`` intervention, loss, inference
path (targets None -> logits of the last position only) and ``generate`` (returns ``(idx, pred_logits)``).
As in crate-lm, an ISTA-site intervention overwrites a ReLU output that autograd saved, so backward through it
raises; it is for no-grad use (generate, evaluation).

Dropped, as no test needs them: ``configure_optimizers`` (AdamW, >= 2-D parameters decay), ``estimate_mfu``,
``crop_block_size``, ``from_pretrained`` (it only builds a fresh model from a preset table), the "number of
parameters" print of crate_overcomplete.py's constructor and the "output shape" debug print in crate.py's ISTA
forward. The config's ``bias`` field is kept but, as in crate-lm, unused (LayerNorms always have a bias).
It is never imported by the package.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    def __init__(self, ndim, bias=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Tied q = k = v masked MSSA. flash=True is crate_overcomplete.py's (SDPA, y_hook), flash=False crate.py's
    (manual masked softmax over the ``bias`` buffer)."""

    def __init__(self, config, flash):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=True)
        if flash:
            self.y_hook = nn.Identity()
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = flash
        if not flash:
            mask = torch.tril(torch.ones(config.block_size, config.block_size))
            self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))

    def forward(self, x, enhanced_feature_id=None):
        B, T, C = x.size()
        w = self.c_attn(x)                                                     # crate-lm's "qkv": q = k = v
        if enhanced_feature_id is not None:
            w[:, :, enhanced_feature_id[0]] = enhanced_feature_id[1]
        w = w.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)      # (B, nh, T, hs)
        if self.flash:
            y = F.scaled_dot_product_attention(w, w, w, attn_mask=None,
                                               dropout_p=self.dropout if self.training else 0, is_causal=True)
        else:
            att = (w @ w.transpose(-2, -1)) * (1.0 / math.sqrt(w.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ w
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        if self.flash:
            y = self.y_hook(y)
        return self.resid_dropout(self.c_proj(y))


class SquareISTA(nn.Module):
    """crate.py's MLP: one ISTA step, W (d, d); enhanced_feature_id overwrites a coordinate of the output."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(config.n_embd, config.n_embd)))
        self.step_size = 0.1
        self.relu = nn.ReLU()
        self.lambd = 0.1

    def forward(self, x, enhanced_feature_id=None):
        x1 = F.linear(x, self.weight)                                          # x W^T
        grad_1 = F.linear(x1, self.weight.t())                                 # x W^T W
        grad_2 = F.linear(x, self.weight.t())                                  # x W
        grad_update = self.step_size * (grad_2 - grad_1) - self.step_size * self.lambd
        output = self.relu(x + grad_update)
        if enhanced_feature_id is not None:
            output[:, :, enhanced_feature_id[0]] = enhanced_feature_id[1]
        return output


class OvercompleteISTA(nn.Module):
    """crate_overcomplete.py's MLP: two ISTA steps from zero, W (4d, d), output a2 W; enhanced_feature_id
    overwrites a coordinate of the sparse code a2 before the synthesis."""

    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(4 * config.n_embd, config.n_embd)))
        self.relu = nn.ReLU()
        self.step_size = 0.1
        self.lambd = 0.1

    def forward(self, x, enhanced_feature_id=None):
        z_init = F.relu(self.step_size * F.linear(x, self.weight) - self.step_size * self.lambd)    # a1
        x1 = F.linear(z_init, self.weight.t())                                 # a1 W
        grad_1 = F.linear(x1, self.weight)                                     # a1 W W^T
        grad_2 = F.linear(x, self.weight)                                      # x W^T
        grad_update = self.step_size * (grad_2 - grad_1) - self.step_size * self.lambd
        code = self.relu(z_init + grad_update)                                 # a2
        if enhanced_feature_id is not None:
            code[:, :, enhanced_feature_id[0]] = enhanced_feature_id[1]
        return F.linear(code, self.weight.t())                                 # a2 W


class Block(nn.Module):
    def __init__(self, config, overcomplete):
        super().__init__()
        self.prenorm_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, flash=overcomplete)
        self.prenorm_2 = LayerNorm(config.n_embd)
        self.ista = OvercompleteISTA(config) if overcomplete else SquareISTA(config)

    def forward(self, x, enhanced_feature_id=None):
        """enhanced_feature_id = (feature, value, layer, site): site 'attn' hits the attention, anything else
        the ISTA block."""
        on_attn = enhanced_feature_id is not None and enhanced_feature_id[3] == "attn"
        x = x + self.attn(self.prenorm_1(x), enhanced_feature_id if on_attn else None)
        return self.ista(self.prenorm_2(x), None if on_attn else enhanced_feature_id)


@dataclass
class CRATEConfig:
    block_size: int = 1024
    vocab_size: int = 50304         # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True               # unused by both models, as in crate-lm


class SquareConfig(CRATEConfig):
    """crate.py's CRATEConfig."""


class OvercompleteConfig(CRATEConfig):
    """crate_overcomplete.py's CRATEConfig (the same fields)."""


class _CRATEGPT(nn.Module):
    def __init__(self, config, overcomplete):
        super().__init__()
        assert config.vocab_size is not None
        assert config.block_size is not None
        self.config = config
        modules = dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, overcomplete) for _ in range(config.n_layer)]),
        )
        if overcomplete:
            modules["ln_f"] = LayerNorm(config.n_embd, bias=True)
        self.transformer = nn.ModuleDict(modules)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        # _init_weights visits wte before lm_head, so the tied weight ends with lm_head's draw.
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def get_num_params(self, non_embedding=True):
        """Parameters counted once (the tied head with wte), less wpe when non_embedding."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, enhanced_feature_id=None):
        """idx (b, t) -> (logits, loss): logits (b, t, V) and the mean cross-entropy (ignore_index -1) with
        targets, else logits (b, 1, V) of the last position and None. enhanced_feature_id =
        (feature, value, layer, 'attn' | other) intervenes in block ``layer`` only."""
        b, t = idx.size()
        block_size = self.config.block_size
        assert t <= block_size, f"Cannot forward sequence of length {t}, block size is only {block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device).unsqueeze(0)
        tok_emb = self.transformer.wte(idx)
        pos_emb = self.transformer.wpe(pos)
        x = self.transformer.drop(tok_emb + pos_emb)
        for i, block in enumerate(self.transformer.h):
            if enhanced_feature_id and i == enhanced_feature_id[2]:
                x = block(x, enhanced_feature_id)
            else:
                x = block(x)
        if "ln_f" in self.transformer:
            x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, enhanced_feature_id=None):
        """Sample max_new_tokens tokens, recomputing the (block_size-cropped) context every step. Returns the
        extended idx and the list of each step's raw last-position logits (b, 1, V), before temperature."""
        pred_logits = []
        for _ in range(max_new_tokens):
            block_size = self.config.block_size
            idx_cond = idx if idx.size(1) <= block_size else idx[:, -block_size:]
            logits, _ = self(idx_cond, enhanced_feature_id=enhanced_feature_id)
            pred_logits.append(logits)
            logits = logits[:, -1, :] / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("Inf")
            probs = F.softmax(logits, dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx, pred_logits


class SquareCRATE(_CRATEGPT):
    """crate.py's CRATE (the book's Causal-CRATE-Base, 60,699,648 parameters at 12 / 12 / 768)."""

    def __init__(self, config):
        super().__init__(config, overcomplete=False)


class OvercompleteCRATE(_CRATEGPT):
    """crate_overcomplete.py's CRATE (the released CRATE-GPT, 81,934,848 parameters at 12 / 12 / 768)."""

    def __init__(self, config):
        super().__init__(config, overcomplete=True)
