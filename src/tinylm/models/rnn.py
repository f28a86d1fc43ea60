"""RNN encoder-decoder: the fixed-length context vector, and additive attention as a switch.

Without attention this is the encoder-decoder of Cho et al. 2014 ("Learning Phrase
Representations using RNN Encoder-Decoder") and Sutskever et al. 2014: a GRU or LSTM reads
the source, and its final hidden state, the *context vector* c, is all the decoder ever sees
of it. The decoder starts from the encoder's final state and gets c again at every step
(Cho et al. feed c into each step, so it is not forgotten), but however long the source, it
must fit through those d_model numbers: the bottleneck `tinylm experiment bottleneck` shows.

With `attention = true` it becomes Bahdanau et al. 2015 ("Neural Machine Translation by
Jointly Learning to Align and Translate"): at step t the decoder scores every encoder output
h_j against its previous state s_{t-1} with a small MLP, e_tj = v^T tanh(W s_{t-1} + U h_j)
(additive attention), and feeds the weighted average of the h_j in place of the fixed c.

Choices: a unidirectional encoder (the paper's is bidirectional) so the two variants differ
in attention only; the output layer is a tanh layer over [s_t; c_t; y_{t-1}] (the paper's
"deep output", with tanh instead of maxout) before the `generator` projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tinylm.models.layers import optim_groups


@dataclass
class RNNConfig:
    vocab_size: int = 0  # source vocabulary (and the target's when shared); 0 = tokenizer's
    tgt_vocab_size: int = 0  # 0 = shared vocabulary with the source
    block_size: int = 64  # the longest target the decoder writes (RNNs need no position table)
    cell: str = "gru"  # gru | lstm
    n_layer: int = 1  # stacked layers in encoder and decoder
    d_model: int = 256  # hidden size = size of the context vector = embedding size
    attention: bool = False  # Bahdanau additive attention over all encoder outputs
    dropout: float = 0.1
    tie_embeddings: bool = True  # one embedding table for source and target (one vocab only)
    pad_id: int = 0

    def __post_init__(self):
        if self.cell not in ("gru", "lstm"):
            raise ValueError(f"cell={self.cell!r} is not one of gru, lstm")
        if self.n_layer < 1:
            raise ValueError("n_layer must be at least 1")

    @property
    def target_vocab(self) -> int:
        return self.tgt_vocab_size or self.vocab_size


class Encoder(nn.Module):
    """Reads the source; returns every output h_j and the final state (the context vector)."""

    def __init__(self, c: RNNConfig):
        super().__init__()
        rnn_cls = nn.GRU if c.cell == "gru" else nn.LSTM
        self.rnn = rnn_cls(c.d_model, c.d_model, num_layers=c.n_layer, batch_first=True,
                           dropout=c.dropout if c.n_layer > 1 else 0.0)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, S, E) embedded source, lengths (B,). Returns outputs (B, S, H) and the final
        state (L, B, H) for a GRU or (L, B, 2H) = [h; c] for an LSTM."""
        # Packing makes the final state the one after each row's last real token, not after
        # its padding.
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        if isinstance(state, tuple):  # LSTM: keep h and the cell state c side by side
            state = torch.cat(state, dim=-1)
        return out, state


class AdditiveAttention(nn.Module):
    """Bahdanau attention: score_j = v^T tanh(W_q s + W_k h_j), softmax over real tokens."""

    def __init__(self, d_model: int):
        super().__init__()
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=True)
        self.v = nn.Linear(d_model, 1, bias=False)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, memory: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, H) decoder state; keys (B, S, H) = w_k(memory), precomputed once per
        source; mask (B, S) True at real tokens. Returns context (B, H) and weights (B, S)."""
        scores = self.v(torch.tanh(self.w_q(query)[:, None] + keys)).squeeze(-1)  # (B, S)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return (weights[:, None] @ memory).squeeze(1), weights  # (B, H), (B, S)


@dataclass
class RNNState:
    """The decoder's recurrent state plus what it reads of the source."""

    hidden: torch.Tensor  # (L, B, H) or (L, B, 2H) for an LSTM
    memory: torch.Tensor  # (B, S, H) encoder outputs (read only with attention)
    keys: torch.Tensor | None  # (B, S, H) w_k(memory), with attention
    mask: torch.Tensor  # (B, S) True at real source tokens
    context: torch.Tensor  # (B, H) the fixed context vector

    def select(self, rows: torch.Tensor) -> None:
        """Keep / repeat batch rows (beam search expands and reorders hypotheses)."""
        self.hidden = self.hidden[:, rows]
        self.memory, self.mask, self.context = self.memory[rows], self.mask[rows], \
            self.context[rows]
        if self.keys is not None:
            self.keys = self.keys[rows]


class Decoder(nn.Module):
    """[y_{t-1}; c_t] -> stacked GRU/LSTM -> tanh output layer, over T steps at once.

    Without attention c_t = c for every t, so all inputs are known up front and the recurrent
    layers run in one fused call; with attention c_t depends on s_{t-1}, so it steps in a loop.
    Generation calls it with T = 1.
    """

    def __init__(self, c: RNNConfig):
        super().__init__()
        self.d = c.d_model
        rnn_cls = nn.GRU if c.cell == "gru" else nn.LSTM
        self.rnn = rnn_cls(2 * c.d_model, c.d_model, num_layers=c.n_layer, batch_first=True,
                           dropout=c.dropout if c.n_layer > 1 else 0.0)
        self.attention = AdditiveAttention(c.d_model) if c.attention else None
        self.out = nn.Linear(3 * c.d_model, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.keep_weights = False
        self.weights: list[torch.Tensor] = []  # (B, S) per step, when keep_weights

    def _run(self, x: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The recurrent layers over x (B, T, 2H); hidden is (L, B, H), or (L, B, 2H) = [h; c]
        for an LSTM."""
        if isinstance(self.rnn, nn.LSTM):
            out, (h, c) = self.rnn(x, (hidden[..., : self.d].contiguous(),
                                       hidden[..., self.d :].contiguous()))
            return out, torch.cat([h, c], dim=-1)
        return self.rnn(x, hidden.contiguous())

    def forward(self, y_emb: torch.Tensor, state: RNNState) -> torch.Tensor:
        """y_emb (B, T, E) embeddings of the previous target tokens; advances state.hidden.
        Returns the pre-generator outputs (B, T, H)."""
        T = y_emb.shape[1]
        if self.attention is None:
            context = state.context[:, None].expand(-1, T, -1)  # the same c at every step
            out, state.hidden = self._run(torch.cat([y_emb, context], dim=-1), state.hidden)
        else:
            outs, contexts = [], []
            for t in range(T):
                s_prev = state.hidden[-1, :, : self.d]  # (B, H) top layer's h
                ctx, w = self.attention(s_prev, state.keys, state.memory, state.mask)
                if self.keep_weights:
                    self.weights.append(w.detach())
                x = torch.cat([y_emb[:, t], ctx], dim=-1)[:, None]  # (B, 1, 2H)
                o, state.hidden = self._run(x, state.hidden)
                outs.append(o)
                contexts.append(ctx)
            out, context = torch.cat(outs, dim=1), torch.stack(contexts, dim=1)  # (B, T, H)
        return self.drop(torch.tanh(self.out(torch.cat([out, context, y_emb], dim=-1))))


class RNNEncoderDecoder(nn.Module):
    """EncoderDecoder with recurrent parts; `config.attention` switches Bahdanau on."""

    family = "rnn"

    def __init__(self, config: RNNConfig):
        super().__init__()
        self.config = c = config
        self.src_emb = nn.Embedding(c.vocab_size, c.d_model)
        shared = c.tie_embeddings and c.tgt_vocab_size == 0
        self.tgt_emb = self.src_emb if shared else nn.Embedding(c.target_vocab, c.d_model)
        self.emb_drop = nn.Dropout(c.dropout)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        self.generator = nn.Linear(c.d_model, c.target_vocab)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def optim_groups(self) -> dict[str, list[nn.Parameter]]:
        return optim_groups(self, [self.src_emb, self.tgt_emb, self.generator])

    def start(self, src: torch.Tensor, max_len: int | None = None) -> RNNState:
        """Encode the source (B, S); the decoder starts from the encoder's final state."""
        mask = src != self.config.pad_id  # (B, S)
        lengths = mask.sum(1).clamp(min=1)
        memory, final = self.encoder(self.emb_drop(self.src_emb(src)), lengths)
        context = final[-1, :, : self.config.d_model]  # (B, H): top layer's last h
        keys = self.decoder.attention.w_k(memory) if self.decoder.attention else None
        return RNNState(final, memory, keys, mask, context)

    def step(self, state: RNNState, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one target token per row (B,); returns next-token logits (B, V)."""
        out = self.decoder(self.emb_drop(self.tgt_emb(tokens[:, None])), state)  # (B, 1, H)
        return self.generator(out[:, 0]).float()

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor,
                tgt_out: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing. src (B, S), tgt_in (B, T) = BOS + target. Returns logits
        (B, T, V), or the mean cross-entropy against tgt_out (B, T) = target + EOS."""
        state = self.start(src)
        out = self.decoder(self.emb_drop(self.tgt_emb(tgt_in)), state)  # (B, T, H)
        logits = self.generator(out).float()  # (B, T, V)
        if tgt_out is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), tgt_out.reshape(-1),
                               ignore_index=-100)
