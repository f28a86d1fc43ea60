"""GPT: a decoder-only language model (Radford et al. 2018/2019), with modern switches.

Every choice that wins at small scale in modded-nanogpt and nanochat is a config switch:
rotary positions, RMSNorm, QK-norm, ReLU² or SwiGLU MLP, an untied output head, zero-init
output projections and a tanh logit soft-cap. `gpt2_style()` turns them all back into GPT-2
(learned positions, LayerNorm with biases, GELU, tied head). The switches real pretrained
checkpoints need are here too, so an import computes the original's function exactly:
grouped-query attention (`n_kv_head`), q/k/v-only biases (`qkv_bias`, Qwen2), the norm's
epsilon (`norm_eps`) and rotary scaling (`rope_scaling`, Llama 3.1+). `depth` is a size
dial: set it and width and heads follow (d_model = 64 * depth, one head per 64 dims), as in
nanochat.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.models.layers import (
    ROPE_SCALINGS,
    Block,
    KVCache,
    Packed,
    Rotary,
    check_stack_options,
    count_params,
    flops_per_token,
    init_stack,
    make_norm,
    mlp_hidden,
    optim_groups,
    rope_frequencies,
)


@dataclass
class GPTConfig:
    vocab_size: int = 0  # 0 = take it from the tokenizer
    block_size: int = 256  # context length
    depth: int = 0  # size dial: if > 0, sets n_layer=depth, d_model=64*depth, n_head=depth
    n_layer: int = 6
    n_head: int = 6
    d_model: int = 384
    mlp: str = "relu2"  # relu2 | swiglu | gelu | relu
    mlp_ratio: float = 4.0  # hidden = mlp_ratio * d_model (swiglu: 2/3 of that, as Llama)
    norm: str = "rms"  # rms | layer
    pos: str = "rope"  # rope | learned
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | linear | llama3 (see layers.rope_frequencies)
    rope_factor: float = 1.0  # the scalings' parameters, as in transformers' rope_parameters
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0 = n_head
    norm_eps: float = 0.0  # 0 = 1e-6 for rms, 1e-5 for layer (torch's default)
    qkv_bias: bool = False  # biases on q, k, v only (Qwen2); `bias` puts them everywhere
    qk_norm: bool = True
    tie_embeddings: bool = False
    zero_init: bool = True  # output projections start at zero (modded-nanogpt)
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap)
    bias: bool = False
    dropout: float = 0.0

    def __post_init__(self):
        if self.depth > 0:
            self.n_layer, self.d_model, self.n_head = self.depth, 64 * self.depth, self.depth
        check_stack_options(self.d_model, self.n_head, self.mlp, self.norm, self.pos)
        if self.n_kv_head and (self.n_kv_head < 0 or self.n_head % self.n_kv_head):
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling={self.rope_scaling!r} is not one of "
                             f"{', '.join(ROPE_SCALINGS)}")

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head for plain multi-head attention."""
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def rope_frequencies(self) -> torch.Tensor:
        return rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling,
                                self.rope_factor, self.rope_low_freq_factor,
                                self.rope_high_freq_factor, self.rope_original_max_len)

    @property
    def hidden(self) -> int:
        return mlp_hidden(self.mlp, self.mlp_ratio, self.d_model)


def gpt2_style(**overrides) -> GPTConfig:
    """The GPT-2 recipe: learned positions, LayerNorm + biases, GELU, tied embeddings."""
    base = dict(mlp="gelu", norm="layer", pos="learned", qk_norm=False, tie_embeddings=True,
                zero_init=False, bias=True)
    return GPTConfig(**(base | overrides))


class GPT(nn.Module):
    family = "gpt"

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.d_model)
        self.pos_emb = nn.Embedding(c.block_size, c.d_model) if c.pos == "learned" else None
        rotary = (Rotary(c.head_dim, c.rope_theta, c.rope_frequencies()) if c.pos == "rope"
                  else None)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.hidden, mlp=c.mlp, norm=c.norm, bias=c.bias,
                  qk_norm=c.qk_norm, rotary=rotary, dropout=c.dropout, causal=True,
                  n_kv_head=c.kv_heads, qkv_bias=c.qkv_bias, norm_eps=c.norm_eps)
            for _ in range(c.n_layer)
        )
        self.norm_f = make_norm(c.norm, c.d_model, c.bias, c.norm_eps)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        init_stack(self, self.blocks, c.zero_init)

    def num_params(self, embeddings: bool = True) -> int:
        return count_params(self, embeddings)

    def flops_per_token(self, T: int | None = None) -> float:
        return flops_per_token(self, T)

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return optim_groups(self, [self.tok_emb, self.pos_emb, self.lm_head])

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      packed: Packed | None = None) -> torch.Tensor:
        """The final norm's output (B, T, C) for idx (B, T), continuing `cache` if given.
        With `packed` (layers.Packed, built from idx's rows) the blocks run on its rows,
        whose shared prefixes are computed once, and the states come back in idx's layout."""
        if packed is not None:
            return packed.unpack(self._trunk(packed.ids, packed.positions, packed))
        T = idx.shape[1]
        positions = cache.positions(T, idx.device) if cache is not None else None
        mask = cache.mask(T, idx.device) if cache is not None else None
        h = self._trunk(idx, positions, mask, cache)
        if cache is not None:
            cache.advance(T)
        return h

    def _trunk(self, idx: torch.Tensor, positions: torch.Tensor | None,
               mask: torch.Tensor | Packed | None, cache: KVCache | None = None) -> torch.Tensor:
        T = idx.shape[1]
        x = self.tok_emb(idx)  # (B, T, C)
        if self.pos_emb is not None:
            p = positions if positions is not None else torch.arange(T, device=idx.device)
            x = x + self.pos_emb(p)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, mask=mask, cache=cache, layer=i, positions=positions)
        return self.norm_f(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(h).float()
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """idx: (B, T) token ids. Returns logits (B, T, V), or the mean cross-entropy against
        `targets` (B, T) when given (positions with target -100 are ignored)."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence of {idx.shape[1]} tokens is longer than block_size="
                             f"{self.config.block_size}")
        logits = self.logits(self.hidden_states(idx))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-100)

    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits (B, T, V) for `idx` continuing what `cache` already holds; fills the cache."""
        if cache.pos + idx.shape[1] > self.config.block_size and self.pos_emb is not None:
            raise ValueError(f"context of {cache.pos + idx.shape[1]} tokens exceeds the learned "
                             f"positions (block_size={self.config.block_size})")
        return self.logits(self.hidden_states(idx, cache))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  pad: torch.Tensor | None = None) -> KVCache:
        c = self.config
        p = self.lm_head.weight
        return KVCache(c.n_layer, batch, c.kv_heads, c.head_dim, max_len,
                       dtype or p.dtype, p.device, pad)  # n_kv_head heads: GQA's saving
