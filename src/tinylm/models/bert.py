"""BERT: an encoder-only masked language model (Devlin et al. 2018), with modern switches.

Every token sees every other token (bidirectional self-attention, `causal=False`), except
padding: positions holding `pad_id` are never attended to, so a short sentence padded into a
batch gets the same outputs as when it is alone. Trained with the masked-LM objective (see
tinylm.data.mlm): some positions are hidden and the model predicts the original token there;
`forward(idx, targets)` scores only those positions (targets = -100 elsewhere), which also
skips the vocabulary projection on the ~85% of positions that carry no loss.

Defaults follow what trains fast at small scale (as ModernBERT and our GPT do): pre-norm
blocks with a final norm, RMSNorm, rotary positions, QK-norm, ReLU² MLP, zero-initialised
residual projections. Rotary rather than BERT's learned table because a fill-mask prompt is a
short sentence while training windows are long random cuts of a corpus: with relative positions
the model has no table of absolute slots to learn and treats "the [MASK] is" the same at
position 1 and at position 100. `bert_style()` switches back to the 2018 recipe (post-norm,
learned positions, LayerNorm with biases, GELU). The output head is BERT's: dense, activation,
norm, then a decoder tied to the token embeddings with a per-token bias (the unigram prior).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.models.layers import (
    Block,
    Rotary,
    check_stack_options,
    count_params,
    flops_per_token,
    init_stack,
    make_norm,
    mlp_hidden,
    optim_groups,
)


@dataclass
class BertConfig:
    vocab_size: int = 0  # 0 = take it from the tokenizer
    block_size: int = 128  # longest input
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    mlp: str = "relu2"  # relu2 | swiglu | gelu | relu
    mlp_ratio: float = 4.0  # hidden = mlp_ratio * d_model (swiglu: 2/3 of that, as Llama)
    norm: str = "rms"  # rms | layer
    pos: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    qk_norm: bool = True
    post_norm: bool = False  # True: norm(x + f(x)) as in BERT, with a norm on the embeddings
    tie_embeddings: bool = True  # the MLM decoder reuses the token embeddings, as BERT does
    zero_init: bool = True  # residual output projections start at zero
    bias: bool = False
    dropout: float = 0.0
    pad_id: int = 0  # padding token: never attended to (tinylm tokenizers put <|pad|> at 0)

    def __post_init__(self):
        check_stack_options(self.d_model, self.n_head, self.mlp, self.norm, self.pos)

    @property
    def hidden(self) -> int:
        return mlp_hidden(self.mlp, self.mlp_ratio, self.d_model)


def bert_style(**overrides) -> BertConfig:
    """The 2018 BERT recipe: post-norm, learned positions, LayerNorm + biases, GELU."""
    base = dict(mlp="gelu", norm="layer", pos="learned", qk_norm=False, post_norm=True,
                zero_init=False, bias=True)
    return BertConfig(**(base | overrides))


class MLMHead(nn.Module):
    """Hidden state -> vocabulary logits: dense, GELU, norm, decoder (+ per-token bias)."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.d_model, c.d_model, bias=c.bias)
        self.norm = make_norm(c.norm, c.d_model, c.bias)
        self.decoder = nn.Linear(c.d_model, c.vocab_size, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(h), approximate="tanh")))


class BertModel(nn.Module):
    family = "bert"

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.block_size, c.d_model) if c.pos == "learned" else None
        rotary = Rotary(c.d_model // c.n_head, c.rope_theta) if c.pos == "rope" else None
        # Post-norm blocks end in a norm already; what they lack is a norm on their input.
        self.norm_emb = make_norm(c.norm, c.d_model, c.bias) if c.post_norm else None
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.hidden, mlp=c.mlp, norm=c.norm, bias=c.bias,
                  qk_norm=c.qk_norm, rotary=rotary, dropout=c.dropout, causal=False,
                  post_norm=c.post_norm)
            for _ in range(c.n_layer)
        )
        self.norm_f = None if c.post_norm else make_norm(c.norm, c.d_model, c.bias)
        self.mlm_head = MLMHead(c)
        init_stack(self, self.blocks, c.zero_init)
        if c.tie_embeddings:  # tied after init, so the shared matrix is drawn once
            self.mlm_head.decoder.weight = self.tok_emb.weight

    def num_params(self, embeddings: bool = True) -> int:
        return count_params(self, embeddings)

    def flops_per_token(self, T: int | None = None) -> float:
        """An upper bound: the vocabulary projection only runs on the masked ~15%."""
        return flops_per_token(self, T)

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        """The MLM head's dense layer is a hidden matrix like the blocks' (Muon); only the
        token/position tables and the decoder are tables."""
        return optim_groups(self, [self.tok_emb, self.pos_emb, self.mlm_head.decoder])

    def padding_mask(self, idx: torch.Tensor) -> torch.Tensor | None:
        """Boolean (B, 1, 1, T): True where a key is a real token. None when nothing is
        padding, so attention keeps its fast unmasked path."""
        real = idx != self.config.pad_id  # (B, T)
        if bool(real.all()):
            return None
        real = real | ~real.any(dim=1, keepdim=True)  # an all-padding row: avoid 0/0 softmax
        return real[:, None, None, :]

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) token ids, right-padded with pad_id. Returns (B, T, C)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size="
                             f"{self.config.block_size}")
        mask = self.padding_mask(idx)
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))
        if self.norm_emb is not None:
            x = self.norm_emb(x)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask=mask)
        return x if self.norm_f is None else self.norm_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T). Returns logits (B, T, V), or, given `targets` (B, T) holding the
        original token at masked positions and -100 elsewhere, the mean cross-entropy over
        the masked positions."""
        h = self.hidden_states(idx)  # (B, T, C)
        if targets is None:
            return self.mlm_head(h).float()
        picked = targets != -100  # (B, T)
        logits = self.mlm_head(h[picked]).float()  # (N, V), N = number of masked positions
        return F.cross_entropy(logits, targets[picked])
