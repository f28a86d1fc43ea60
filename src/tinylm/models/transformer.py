"""The Transformer encoder-decoder of Vaswani et al. 2017, "Attention Is All You Need".

The encoder reads the whole source with bidirectional self-attention (padding masked out);
the decoder writes the target one token at a time with causal self-attention, and in every
layer its queries also attend over all of the encoder's outputs (cross-attention). Nothing
squeezes the source through one vector: the decoder looks back at every source position.

Choices, and where they depart from the paper:
- positions are the paper's fixed sinusoids, added to embeddings scaled by sqrt(d_model);
- pre-norm (x + f(norm(x))) by default, which trains without warm-up tricks at any depth;
  `post_norm = true` gives the paper's norm(x + f(x));
- one shared vocabulary by default, with source, target and output embeddings tied as in the
  paper (section 3.4); `tgt_vocab_size > 0` gives the target its own vocabulary;
- the same `n_layer` for encoder and decoder (the paper uses 6 and 6).

For generation the decoder runs step by step with a KV cache over its own past
(`start` then `step`), which is what beam search in `tinylm.infer.beam` drives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tinylm.models.layers import Block, KVCache, make_norm, optim_groups, sinusoidal_positions


@dataclass
class TransformerConfig:
    vocab_size: int = 0  # source vocabulary (and the target's when shared); 0 = tokenizer's
    tgt_vocab_size: int = 0  # 0 = shared vocabulary with the source
    block_size: int = 64  # the longest source or target sequence, in tokens
    n_layer: int = 2  # encoder layers, and decoder layers
    n_head: int = 4
    d_model: int = 128
    mlp: str = "relu"  # the paper's ReLU; relu2 | gelu | swiglu also work
    mlp_ratio: float = 4.0  # d_ff = mlp_ratio * d_model (paper: 2048 = 4 * 512)
    norm: str = "layer"  # layer | rms
    post_norm: bool = False  # True = the paper's post-norm; False = pre-norm
    bias: bool = True
    dropout: float = 0.1
    tie_embeddings: bool = True  # share source/target embeddings (when one vocab) and output
    pad_id: int = 0  # padding token in sources: never attended

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_head={self.n_head}")
        if self.d_model % 2:
            raise ValueError("sinusoidal positions need an even d_model")

    @property
    def target_vocab(self) -> int:
        return self.tgt_vocab_size or self.vocab_size

    @property
    def hidden(self) -> int:
        return int(self.mlp_ratio * self.d_model)


class Embeddings(nn.Module):
    """Token embedding * sqrt(d_model) + fixed sinusoidal position, then dropout (section 3.4)."""

    def __init__(self, vocab_size: int, c: TransformerConfig):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, c.d_model)
        self.scale = math.sqrt(c.d_model)
        self.register_buffer("pos", sinusoidal_positions(c.block_size, c.d_model),
                             persistent=False)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = ids.shape[1]
        if start + T > self.pos.shape[0]:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size="
                             f"{self.pos.shape[0]}")
        return self.drop(self.tok(ids) * self.scale + self.pos[start : start + T])  # (B, T, C)


class Encoder(nn.Module):
    """N layers of bidirectional self-attention + MLP over the source."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.hidden, mlp=c.mlp, norm=c.norm, bias=c.bias,
                  dropout=c.dropout, causal=False, post_norm=c.post_norm)
            for _ in range(c.n_layer))
        # Pre-norm leaves the residual stream un-normalised, so it needs one final norm.
        self.norm = nn.Identity() if c.post_norm else make_norm(c.norm, c.d_model, c.bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.norm(x)


class Decoder(nn.Module):
    """N layers of causal self-attention, cross-attention over the encoder output, and MLP."""

    def __init__(self, c: TransformerConfig):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(c.d_model, c.n_head, c.hidden, mlp=c.mlp, norm=c.norm, bias=c.bias,
                  dropout=c.dropout, causal=True, cross=True, post_norm=c.post_norm)
            for _ in range(c.n_layer))
        self.norm = nn.Identity() if c.post_norm else make_norm(c.norm, c.d_model, c.bias)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x, memory=memory, memory_mask=memory_mask, cache=cache, layer=i)
        if cache is not None:
            cache.advance(x.shape[1])
        return self.norm(x)


class Generator(nn.Module):
    """The final linear layer onto the target vocabulary (softmax is left to the loss)."""

    def __init__(self, d_model: int, vocab_size: int):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h).float()


@dataclass
class TransformerState:
    """What decoding one more token needs: the encoded source and the decoder's KV cache."""

    memory: torch.Tensor  # (B, S, C) encoder output
    memory_mask: torch.Tensor  # (B, 1, 1, S) True at real source tokens
    cache: KVCache

    def select(self, rows: torch.Tensor) -> None:
        """Keep / repeat batch rows (beam search expands and reorders hypotheses)."""
        self.memory, self.memory_mask = self.memory[rows], self.memory_mask[rows]
        self.cache.select(rows)


class Transformer(nn.Module):
    """EncoderDecoder: source ids -> encoder memory -> decoder -> next-target-token logits."""

    family = "transformer"

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = c = config
        self.src_emb = Embeddings(c.vocab_size, c)
        shared = c.tie_embeddings and c.tgt_vocab_size == 0
        self.tgt_emb = self.src_emb if shared else Embeddings(c.target_vocab, c)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.generator = Generator(c.d_model, c.target_vocab)
        for p in self.parameters():  # Glorot/Xavier, as the Annotated Transformer
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        if c.tie_embeddings:  # set after init: the tied matrix keeps one initialisation
            self.generator.proj.weight = self.tgt_emb.tok.weight

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return optim_groups(self, [self.src_emb, self.tgt_emb, self.generator])

    def source_mask(self, src: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, S) boolean, True where a query may attend: every non-padding token."""
        return (src != self.config.pad_id)[:, None, None, :]

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, S) -> memory (B, S, C) and its mask (B, 1, 1, S)."""
        mask = self.source_mask(src)
        return self.encoder(self.src_emb(src), mask), mask

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor,
                tgt_out: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing. src (B, S), tgt_in (B, T) = BOS + target. Returns logits (B, T, V),
        or the mean cross-entropy against tgt_out (B, T) = target + EOS, -100 where padded."""
        memory, mask = self.encode(src)
        h = self.decoder(self.tgt_emb(tgt_in), memory, mask)  # (B, T, C)
        logits = self.generator(h)  # (B, T, V)
        if tgt_out is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), tgt_out.reshape(-1),
                               ignore_index=-100)

    # --- step-by-step decoding (greedy and beam search) --------------------------------------
    def start(self, src: torch.Tensor, max_len: int | None = None) -> TransformerState:
        """Encode the source once; make an empty cache for up to `max_len` target tokens."""
        c = self.config
        memory, mask = self.encode(src)
        max_len = min(max_len or c.block_size, c.block_size)
        cache = KVCache(c.n_layer, src.shape[0], c.n_head, c.d_model // c.n_head, max_len,
                        memory.dtype, memory.device)
        return TransformerState(memory, mask, cache)

    def step(self, state: TransformerState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one target token per row (B,); returns next-token logits (B, V)."""
        x = self.tgt_emb(tokens[:, None], start=state.cache.pos)  # (B, 1, C)
        h = self.decoder(x, state.memory, state.memory_mask, cache=state.cache)
        return self.generator(h[:, -1])
