"""Building blocks shared by every model family: norms, positions, attention, MLPs, blocks.

One `Attention` covers the three kinds the families need: causal self-attention (GPT, the
Transformer decoder), bidirectional self-attention with a padding mask (BERT, the Transformer
encoder) and cross-attention (decoder queries over encoder outputs). It runs through
`F.scaled_dot_product_attention` unless someone asked to see the weights
(`attn.keep_weights = True`), in which case it does the softmax by hand and keeps them in
`attn.weights` for the attention-map pictures.
"""

from __future__ import annotations

import bisect
import functools
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tinylm import kernels, perf


def check_stack_options(d_model: int, n_head: int, mlp: str, norm: str, pos: str) -> None:
    """The validation every Transformer-stack config shares (GPT, BERT): ValueError if bad."""
    if d_model % n_head:
        raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}")
    if pos == "rope" and (d_model // n_head) % 2:
        raise ValueError("rotary positions need an even head size (d_model / n_head)")
    for name, value, options in (("mlp", mlp, ("relu2", "swiglu", "gelu", "relu")),
                                 ("norm", norm, ("rms", "layer")),
                                 ("pos", pos, ("rope", "learned"))):
        if value not in options:
            raise ValueError(f"{name}={value!r} is not one of {', '.join(options)}")


def mlp_hidden(kind: str, ratio: float, d_model: int) -> int:
    """MLP width: ratio * d_model; SwiGLU takes 2/3 of it (rounded to 8) to keep the weights
    count equal, as Llama does."""
    h = int(ratio * d_model)
    return int(2 * h / 3) // 8 * 8 if kind == "swiglu" else h


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose weight follows the input's dtype, so bf16 activations (QK-norm under
    autocast) take PyTorch's fused kernel instead of a slow mixed-dtype fallback. On a CPU
    it runs as the C kernels' one loop forward and one backward (`_RMSNormC`), computing in
    fp32 whatever the activations' dtype: PyTorch 2.13's CPU forward takes ten times longer
    on bf16 and its backward is about ten elementwise passes (a reward-model step in bf16:
    12% faster). Without a C compiler it is PyTorch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
                and kernels.available()):
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            w = None if self.weight is None else self.weight.float()
            return _RMSNormC.apply(x, w, eps)
        w = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, w, self.eps)


class _RMSNormC(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * w over the last dim, by kernels.rms_norm (fp32 w) and
    kernels.rms_norm_backward (which recomputes the inverse rms from x: nothing else kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor | None, eps: float) -> torch.Tensor:
        rows = x.contiguous().view(-1, 1, x.shape[-1])  # (N, 1, C)
        ctx.save_for_backward(rows, w)
        ctx.eps = eps
        return kernels.rms_norm(rows, w, eps).view(x.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        rows, w = ctx.saved_tensors
        dx, dw = kernels.rms_norm_backward(rows, g, w, ctx.eps)
        return dx.view(g.shape), (dw if ctx.needs_input_grad[1] else None), None


DEFAULT_EPS = {"rms": 1e-6, "layer": 1e-5}  # tinylm's own RMSNorm; torch's LayerNorm default


def make_norm(kind: str, dim: int, bias: bool = False, eps: float = 0.0) -> nn.Module:
    """RMSNorm or LayerNorm; eps 0 = the kind's default (DEFAULT_EPS). Imported checkpoints
    give their own (most Llamas use 1e-5 in RMSNorm), which moves logits by ~1e-2 if ignored."""
    eps = eps or DEFAULT_EPS.get(kind, 0.0)
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    raise ValueError(f"unknown norm {kind!r}; use 'rms' or 'layer'")


def sinusoidal_positions(n: int, d: int) -> torch.Tensor:
    """The fixed sin/cos position table of Vaswani et al. 2017, shape (n, d)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: d // 2])
    return table


ROPE_SCALINGS = ("none", "linear", "llama3")


def rope_frequencies(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 8192) -> torch.Tensor:
    """Rotary inverse frequencies (head_dim / 2,), optionally rescaled for longer contexts:
    'linear' divides every frequency by `factor` (positions interpolated); 'llama3' (Llama
    3.1+) divides only the low frequencies, those whose wavelength exceeds
    original_max_len / low_freq_factor, and blends smoothly between the two bands, as
    transformers' `_compute_llama3_parameters` does."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling == "linear":
        return inv_freq / factor
    if scaling == "llama3":
        wavelen = 2 * math.pi / inv_freq
        low_wavelen = original_max_len / low_freq_factor
        high_wavelen = original_max_len / high_freq_factor
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (original_max_len / wavelen - low_freq_factor) / (
            high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, blended, scaled)
    if scaling != "none":
        raise ValueError(f"rope scaling {scaling!r} is not one of {', '.join(ROPE_SCALINGS)}")
    return inv_freq


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021), in the rotate-half layout Llama uses.
    `inv_freq` (head_dim / 2,) overrides the plain frequencies (a scaled rope)."""

    def __init__(self, head_dim: int, theta: float = 10000.0,
                 inv_freq: torch.Tensor | None = None):
        super().__init__()
        if inv_freq is None:
            inv_freq = rope_frequencies(head_dim, theta)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._cache: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is None or self._cache[0] < n or self._cache[1].device != device:
            n = max(n, 256)
            freqs = torch.outer(torch.arange(n, device=device, dtype=torch.float32), self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)  # (n, head_dim)
            self._cache = (n, emb.cos(), emb.sin())
        return self._cache[1], self._cache[2]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); positions: (T,) or (B, T) integer positions."""
        cos, sin = self.table(int(positions.max()) + 1, x.device)
        cos, sin = cos[positions].to(x.dtype), sin[positions].to(x.dtype)  # (T, D) or (B, T, D)
        if positions.dim() == 2:
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Preallocated keys and values of every layer, for prefill-then-decode generation.

    With grouped-query attention `n_head` is the number of key/value heads (GPTConfig's
    n_kv_head), fewer than the query heads: the cache is that many times smaller.

    `pos` is how many positions are filled. With left-padded batches, `pad` (B,) holds each
    row's count of padding tokens: those slots are never attended, and rotary positions start
    at 0 on each row's first real token.

    `key_block` > 0 stores the keys in blocks of that many positions, each block transposed:
    (n_layer, B, H, blocks, head_dim, key_block), the layout the C decode kernel reads fastest
    (kernels.c). `keys()` and `append()` still return (B, H, positions, head_dim).
    """

    def __init__(self, n_layer: int, batch: int, n_head: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu",
                 pad: torch.Tensor | None = None, key_block: int = 0):
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.key_block = key_block
        k_shape = shape
        if key_block:
            k_shape = shape[:3] + (-(-max_len // key_block), head_dim, key_block)
        self.k = torch.zeros(k_shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self._per_layer()
        self.max_len = max_len
        self.pos = 0
        self.pad = pad

    def _per_layer(self) -> None:
        # Per-layer views, made once: indexing a 5-D tensor at every call costs more than the
        # copy itself when decoding one token.
        self.k_layers = [self.k[i] for i in range(len(self.k))]
        self.v_layers = [self.v[i] for i in range(len(self.v))]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H, T, D) at the next T positions; the layer's keys and values so
        far (B, H, pos + T, D)."""
        T, end = k.shape[2], self.pos + k.shape[2]
        ks, vs = self.k_layers[layer], self.v_layers[layer]
        if self.key_block:
            blocks = ks.transpose(-1, -2)  # (B, H, blocks, key_block, D)
            t = self.pos
            while t < end:  # one copy per block the new positions touch
                j, o = divmod(t, self.key_block)
                n = min(self.key_block - o, end - t)
                blocks[:, :, j, o : o + n].copy_(k[:, :, t - self.pos : t - self.pos + n])
                t += n
        else:
            ks.narrow(2, self.pos, T).copy_(k)
        vs.narrow(2, self.pos, T).copy_(v)
        return self.keys(layer, end), vs.narrow(2, 0, end)

    def keys(self, layer: int, end: int) -> torch.Tensor:
        """The layer's first `end` keys (B, H, end, D): a view, or a copy with `key_block`."""
        ks = self.k_layers[layer]
        if not self.key_block:
            return ks.narrow(2, 0, end)
        B, H, _, D, _ = ks.shape
        blocks = ks[:, :, : -(-end // self.key_block)].transpose(-1, -2)
        return blocks.reshape(B, H, -1, D)[:, :, :end]

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(self.pos, self.pos + T, device=device)
        if self.pad is None:
            return pos
        return (pos[None, :] - self.pad[:, None]).clamp(min=0)  # (B, T)

    def mask(self, T: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (B or 1, 1, T, pos+T) mask, True where a query may attend; None if all may."""
        if T == 1 and self.pad is None:
            return None
        q = torch.arange(self.pos, self.pos + T, device=device)[:, None]
        k = torch.arange(self.pos + T, device=device)[None, :]
        allowed = (k <= q)[None, None]  # causal, offset by what is already cached
        if self.pad is not None:
            allowed = allowed & (k >= self.pad[:, None])[:, None, None, :]
        return allowed

    def advance(self, T: int) -> None:
        self.pos += T

    def select(self, rows: torch.Tensor) -> None:
        """Keep only some batch rows (beam search, or finished requests dropped)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self._per_layer()
        if self.pad is not None:
            self.pad = self.pad[rows]


def common_prefix(seqs: list[list[int]]) -> int:
    """How many leading tokens all of `seqs` share."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


class Packed:
    """A batch of sequences whose groups share a prefix (a prompt's K answers), laid out with
    the prefix once: a group is one block [prefix, rest of sequence 1, rest of sequence 2,
    ...], several short blocks may share a row, and positions restart after the prefix for
    each sequence. Every position-wise step (embeddings, norms, projections, MLP) runs on the
    packed rows, fewer positions than the plain right-padded (N, T) batch: a prompt's K answers
    cost one prompt, and rows of mixed lengths share their padding (the reward model's batches
    of benchmarks/trl_compare.py: 38% fewer positions). Attention gathers each sequence back
    into a row of its own (`attend`), so a causal model computes for every token exactly what
    it computes in the plain batch. `unpack` gathers the packed rows' hidden states into the
    (N, T) layout (autograd sums the prefix's gradients over its sequences), so whatever reads
    them (a reward head, log-probs) is unchanged.

    ids, positions (P, L); index (N, T): where the token at [n, t] of the plain batch lies in
    ids.view(-1) (a padding slot: the sequence's last token); first (P * L,): the inverse,
    where in the plain batch (n * T + t) each packed position is read from (a prefix token:
    its group's first sequence; padding: 0); tokens: the positions that hold a token."""

    def __init__(self, ids: torch.Tensor, positions: torch.Tensor, index: torch.Tensor,
                 first: torch.Tensor, tokens: int):
        self.ids, self.positions, self.index, self.first = ids, positions, index, first
        self.tokens = tokens  # the packed positions that hold a token (padding aside)

    @classmethod
    def pack(cls, seqs: list[list[int]], groups: list[list[int]], T: int, pad_id: int
             ) -> Packed:
        """seqs: N token lists (none empty); groups: a partition of range(N) into the sequences
        that share a prefix; T: the plain batch's width (>= the longest sequence). A group's
        tokens (its prefix, then each sequence's rest) are one block; the blocks go into rows
        as wide as the longest block, longest first, each into the first row it fits
        (first-fit decreasing), so short blocks fill the padding beside long ones."""
        blocks = []  # per group: tokens, positions, prefix length, offsets per sequence
        for g in groups:
            p = common_prefix([seqs[n] for n in g])
            toks, pos, offsets = list(seqs[g[0]][:p]), list(range(p)), {}
            for n in g:
                rest = seqs[n][p:]
                offsets[n] = [*range(p), *range(len(toks), len(toks) + len(rest))]
                toks += rest
                pos += range(p, p + len(rest))
            blocks.append((toks, pos, p, offsets))
        L = max(len(b[0]) for b in blocks)
        rows: list[list[tuple]] = []  # the blocks of each row
        for b in sorted(blocks, key=lambda b: -len(b[0])):
            row = next((r for r in rows if sum(len(x[0]) for x in r) + len(b[0]) <= L), None)
            if row is None:
                rows.append(row := [])
            row.append(b)
        ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
        positions = torch.zeros((len(rows), L), dtype=torch.long)
        index = torch.zeros((len(seqs), T), dtype=torch.long)
        first = torch.zeros(len(rows) * L, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for toks, pos, p, offsets in row:
                span = slice(at, at + len(toks))
                ids[r, span], positions[r, span] = torch.tensor(toks), torch.tensor(pos)
                for k, (n, off) in enumerate(offsets.items()):
                    flat = torch.tensor(off) + r * L + at
                    index[n, : len(flat)] = flat
                    index[n, len(flat):] = flat[-1]
                    own = slice(0 if k == 0 else p, len(flat))  # the prefix: from one copy
                    first[flat[own]] = n * T + torch.arange(len(flat))[own]
                at += len(toks)
        return cls(ids, positions, index, first, sum(len(b[0]) for b in blocks))

    def unpack(self, h: torch.Tensor) -> torch.Tensor:
        """h (P, L, C) of the packed rows -> (N, T, C) in the plain batch's layout."""
        return h.reshape(-1, h.shape[-1])[self.index]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               causal_attention: Callable[..., torch.Tensor]) -> torch.Tensor:
        """Self-attention of the packed rows, q (P, H, L, D) and k, v (P, H_kv, L, D), computed
        in the plain layout: each sequence's queries, keys and values gathered into a row of
        its own (its prefix, then its own tokens: (N, H, T, D)), where plain causal attention
        (`causal_attention(q, k, v)`, the fast causal paths) is exact, and the outputs read
        back as (P, L, H * D) from one copy per position. Autograd adds each copy's key and
        value gradients back into the packed rows. The prefix's queries are computed once per
        sequence here, yet it beats attending the packed rows under a block mask (what this
        replaced): the mask spends most of its L x L scores on pairs it masks (a prompt and 4
        answers of 60: 5x the scores needed), and PyTorch's CPU attention with a mask is
        slower than its causal one. A reward batch of 8 rows of 260, forward and backward per
        layer: 15.2 ms with the mask, 7.7 gathered (bf16, AMD EPYC); 13.4 and 7.1 in fp32."""
        P, _, L, D = q.shape
        N, T = self.index.shape
        flat = self.index.view(-1)

        def plain(x: torch.Tensor) -> torch.Tensor:  # (P, h, L, D) -> (N, h, T, D)
            h = x.shape[1]
            rows = x.transpose(1, 2).reshape(P * L, h * D).index_select(0, flat)
            return rows.view(N, T, h, D).transpose(1, 2)

        y = causal_attention(plain(q), plain(k), plain(v))  # (N, H, T, D)
        return y.transpose(1, 2).reshape(N * T, -1).index_select(0, self.first).view(P, L, -1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Packed:
        return Packed(*(t.to(device, non_blocking=non_blocking)
                        for t in (self.ids, self.positions, self.index, self.first)),
                      self.tokens)


class Attention(nn.Module):
    """Multi-head attention. Self-attention when `forward(x)`, cross-attention when given `kv`.

    Grouped-query attention (Ainslie et al. 2023) when n_kv_head < n_head: each key/value head
    serves n_head / n_kv_head query heads, so k, v and the KV cache are that many times
    smaller (SmolLM2, Llama 3 and Qwen2.5 are built so). `qkv_bias` gives q, k and v biases
    but not the output projection (Qwen2); `bias` gives all four."""

    def __init__(self, d_model: int, n_head: int, *, bias: bool = False, qk_norm: bool = False,
                 rotary: Rotary | None = None, dropout: float = 0.0, causal: bool = True,
                 n_kv_head: int = 0, qkv_bias: bool = False, norm_eps: float = 0.0):
        super().__init__()
        n_kv_head = n_kv_head or n_head
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        if n_head % n_kv_head:
            raise ValueError(f"n_head={n_head} is not divisible by n_kv_head={n_kv_head}")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, d_model // n_head
        kv_dim = n_kv_head * self.head_dim
        self.q = nn.Linear(d_model, d_model, bias=bias or qkv_bias)
        self.k = nn.Linear(d_model, kv_dim, bias=bias or qkv_bias)
        self.v = nn.Linear(d_model, kv_dim, bias=bias or qkv_bias)
        self.proj = nn.Linear(d_model, d_model, bias=bias)
        # QK-norm: RMSNorm over each head's query and key (as in Qwen3 / modded-nanogpt).
        self.q_norm = make_norm("rms", self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = make_norm("rms", self.head_dim, eps=norm_eps) if qk_norm else None
        self.rotary = rotary
        self.dropout = dropout
        self.causal = causal
        self.keep_weights = False
        self.weights: torch.Tensor | None = None

    def _heads(self, x: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, H, T, D), normed per head (QK-norm) while still contiguous."""
        B, T, C = x.shape
        x = x.view(B, T, C // self.head_dim, self.head_dim)
        return (x if norm is None else norm(x)).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None,
                mask: torch.Tensor | Packed | None = None, cache: KVCache | None = None,
                layer: int = 0, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, C). kv: (B, S, C) encoder output for cross-attention. mask: bool,
        broadcastable to (B, H, T, S), True = may attend, or the Packed layout x's rows are in
        (attended by `Packed.attend`). cache: decode-time KV cache."""
        B, T, C = x.shape
        src = x if kv is None else kv
        q, k = self._heads(self.q(x), self.q_norm), self._heads(self.k(src), self.k_norm)
        v = self._heads(self.v(src))
        if self.rotary is not None:
            if positions is None:
                positions = torch.arange(T, device=x.device)
            q, k = self.rotary(q, positions), self.rotary(k, positions)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        if isinstance(mask, Packed):  # packed rows (a shared prompt once)
            return self.proj(mask.attend(q, k, v, self._attend))
        causal = self.causal and kv is None and mask is None and cache is None
        y = self._attend(q, k, v, mask, causal, plain_rows=cache is None and kv is None)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None, causal: bool = True, plain_rows: bool = True
                ) -> torch.Tensor:
        """The (B, H, T, D) output. By hand where it measured faster (short causal rows in
        bf16 on a CPU: see by_hand_table) or where the weights are kept; `plain_rows` (no
        cache, no cross-attention): every query of a causal row sees at least itself."""
        gqa = self.n_kv_head < self.n_head  # k, v: (B, n_kv_head, S, D), shared by groups
        drop = self.dropout if self.training else 0.0
        fast = (self.causal and plain_rows and not drop and q.device.type == "cpu"
                and not torch.compiler.is_compiling() and by_hand_faster(q.dtype, k.shape[2]))
        if not (self.keep_weights or fast):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop,
                                                  is_causal=causal, enable_gqa=gqa)
        if gqa:
            group = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        y, w = attention_by_hand(q, k, v, mask, causal, self.keep_weights)
        if self.keep_weights:
            self.weights = w.detach()
        return y


def attention_by_hand(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      mask: torch.Tensor | None, causal: bool, empty_rows: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D), masked) v as two matmuls and a softmax in fp32: the output
    (B, H, T, D) and the weights (B, H, T, S), both in q's dtype. `empty_rows`: a query the
    mask leaves no key (a padding query of a padding mask) gets zero weights, not NaN (a
    pass over the weights that a causal row, which always sees itself, does not need)."""
    scores = q @ k.transpose(-2, -1)  # (B, H, T, S)
    if causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    w = F.softmax(scores * (1 / math.sqrt(q.shape[-1])), -1, dtype=torch.float32)
    if empty_rows:
        w = w.nan_to_num(0.0)
    w = w.to(q.dtype)
    return w @ v, w


# The causal row lengths by_hand_table races at; a row of length S takes the verdict of the
# longest of them <= S, and rows longer than the last keep SDPA (by hand holds S x S scores).
BY_HAND_LENGTHS = (64, 96, 128, 160, 192, 224, 256, 320, 384, 512)


def by_hand_faster(dtype: torch.dtype, S: int) -> bool:
    """Whether causal attention over rows of S keys in `dtype` runs faster by hand
    (`attention_by_hand`) than through F.scaled_dot_product_attention on this CPU, by the
    table `by_hand_table` measured."""
    if S > BY_HAND_LENGTHS[-1]:
        return False
    at = BY_HAND_LENGTHS[max(0, bisect.bisect_right(BY_HAND_LENGTHS, S) - 1)]
    return by_hand_table(dtype)[at]


@functools.cache
def by_hand_table(dtype: torch.dtype) -> dict[int, bool]:
    """For each of BY_HAND_LENGTHS, whether `attention_by_hand`'s forward and backward ran at
    least 5% faster than SDPA's on this CPU in `dtype`, timed at 2048 positions of 4 heads of
    64 in turns; measured once per machine (about a second) and cached (perf.measured).
    PyTorch 2.13's CPU flash attention splits the queries into blocks of 32 below 192
    positions and of 64 from there, so its speed is not monotonic in the length: on the
    2-core AMX Xeon in bf16, 15 rows of 176 took 20.5 ms against 14.6 by hand, 11 rows of 192
    10.0 against 12.5, 32 rows of 64 11.7 against 3.9. In fp32 SDPA won at every length."""
    table = perf.measured(f"attention by hand faster, {dtype}", lambda: _by_hand_race(dtype))
    return {int(k): bool(v) for k, v in table.items()}


@torch.inference_mode(False)
@torch.enable_grad()
@torch.autocast("cpu", enabled=False)
def _by_hand_race(dtype: torch.dtype) -> dict[str, bool]:
    gen = torch.Generator().manual_seed(0)  # the global RNG is left alone
    table = {}
    for T in BY_HAND_LENGTHS:
        shape = (max(1, 2048 // T), 4, T, 64)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        qkv = [torch.randn(shape, generator=gen).to(dtype).requires_grad_() for _ in range(3)]
        best = {"hand": float("inf"), "sdpa": float("inf")}
        for _ in range(3):
            for name in best:  # in turns, so that load slows both alike
                t = time.perf_counter()
                if name == "hand":
                    y = attention_by_hand(*qkv, mask, False)[0]
                else:
                    y = F.scaled_dot_product_attention(*qkv, attn_mask=mask)
                y.float().sum().backward()
                best[name] = min(best[name], time.perf_counter() - t)
        table[str(T)] = best["hand"] < 0.95 * best["sdpa"]
    return table


class MLP(nn.Module):
    """Position-wise feed-forward: ReLU² (modded-nanogpt), GELU (GPT-2) or SwiGLU (Llama)."""

    def __init__(self, d_model: int, hidden: int, kind: str = "relu2", bias: bool = False):
        super().__init__()
        if kind not in ("relu2", "gelu", "relu", "swiglu"):
            raise ValueError(f"unknown mlp {kind!r}; use relu2, gelu, relu or swiglu")
        self.kind = kind
        self.gate = nn.Linear(d_model, hidden, bias=bias) if kind == "swiglu" else None
        self.fc = nn.Linear(d_model, hidden, bias=bias)
        self.proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "relu2":
            h = F.relu(h).square()
        elif self.kind == "gelu":
            h = F.gelu(h, approximate="tanh")
        elif self.kind == "relu":
            h = F.relu(h)
        else:
            h = F.silu(self.gate(x)) * h
        return self.proj(h)


class Block(nn.Module):
    """One Transformer layer: self-attention, optional cross-attention, MLP, each residual.

    Pre-norm (x + f(norm(x))) by default; post-norm (norm(x + f(x))) as in the 2017 paper.
    """

    def __init__(self, d_model: int, n_head: int, hidden: int, *, mlp: str = "relu2",
                 norm: str = "rms", bias: bool = False, qk_norm: bool = False,
                 rotary: Rotary | None = None, dropout: float = 0.0, causal: bool = True,
                 cross: bool = False, post_norm: bool = False, n_kv_head: int = 0,
                 qkv_bias: bool = False, norm_eps: float = 0.0):
        super().__init__()
        self.post_norm = post_norm
        self.norm1 = make_norm(norm, d_model, bias, norm_eps)
        self.attn = Attention(d_model, n_head, bias=bias, qk_norm=qk_norm, rotary=rotary,
                              dropout=dropout, causal=causal, n_kv_head=n_kv_head,
                              qkv_bias=qkv_bias, norm_eps=norm_eps)
        self.norm_x = make_norm(norm, d_model, bias, norm_eps) if cross else None
        self.cross = Attention(d_model, n_head, bias=bias, dropout=dropout) if cross else None
        self.norm2 = make_norm(norm, d_model, bias, norm_eps)
        self.mlp = MLP(d_model, hidden, mlp, bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | Packed | None = None,
                memory: torch.Tensor | None = None, memory_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, layer: int = 0,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        def attn(h):
            return self.attn(h, mask=mask, cache=cache, layer=layer, positions=positions)

        steps = [(self.norm1, attn)]
        if self.cross is not None:
            steps.append((self.norm_x, lambda h: self.cross(h, kv=memory, mask=memory_mask)))
        steps.append((self.norm2, self.mlp))
        for norm, f in steps:
            if self.post_norm:
                x = norm(x + self.drop(f(x)))
            else:
                x = x + self.drop(f(norm(x)))
        return x


# --- what GPT and BERT share: initialisation, sizes, optimizer groups ------------------------
def init_stack(model: nn.Module, blocks: nn.ModuleList, zero_init: bool) -> None:
    """GPT-2's initialisation: N(0, 0.02) for every Linear and Embedding, zero biases; the
    residual branches' output projections start at zero (modded-nanogpt), or scaled down by
    sqrt(2 * n_layer) as GPT-2 does."""
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
    for block in blocks:
        for proj in (block.attn.proj, block.mlp.proj):
            if zero_init:
                nn.init.zeros_(proj.weight)
            else:
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * len(blocks)))


def count_params(model: nn.Module, embeddings: bool = True) -> int:
    """Parameters of a token stack (a tied weight counts once); without its token and
    position tables when `embeddings` is False."""
    n = sum(p.numel() for p in model.parameters())
    if not embeddings:
        n -= model.tok_emb.weight.numel()
        n -= model.pos_emb.weight.numel() if model.pos_emb is not None else 0
    return n


def flops_per_token(model: nn.Module, T: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM paper's appendix: 6 per
    non-embedding weight, plus attention's 12 * n_layer * d_model * T."""
    c = model.config
    T = T or c.block_size
    return 6 * count_params(model, embeddings=False) + 12 * c.n_layer * c.d_model * T


def optim_groups(model: nn.Module, tables: list[nn.Module | None]
                 ) -> dict[str, list[nn.Parameter]]:
    """The model's trainable parameters by how the optimizer treats them:
    'matrix': the 2-D weights inside the network (Muon takes these);
    'embed': the weights of `tables`, the token/position tables and output heads, whose rows
    are looked up or scored one token at a time (AdamW: orthogonalising them makes no sense);
    'other': vectors, i.e. norms and biases (AdamW, no weight decay).
    A tied weight appears once."""
    table_ids = {id(p) for m in tables if m is not None for p in m.parameters()}
    groups: dict[str, list[nn.Parameter]] = {"matrix": [], "embed": [], "other": []}
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        kind = "embed" if id(p) in table_ids else "matrix" if p.ndim == 2 else "other"
        groups[kind].append(p)
    return groups
