"""Greedy and beam-search decoding for encoder-decoder models (Transformer and RNN families).

Both drive the same two-method interface every encoder-decoder family provides:
`state = model.start(src)` encodes the source once, and `logits = model.step(state, tokens)`
feeds one target token per row and returns the next-token logits (B, V); `state.select(rows)`
keeps, repeats or reorders rows, which is all beam search needs to juggle hypotheses.

Beam search keeps the `beam_size` best partial translations per source. A hypothesis that
emits EOS among the top `beam_size` candidates is finished; a source is done once it has
`beam_size` finished hypotheses (or at `max_len`), and the winner is the one with the best
length-normalised score, log p(y|x) / lp(y), with the GNMT length penalty
lp(y) = ((5 + |y|) / 6) ** alpha (Wu et al. 2016). alpha = 0 is the raw log-probability,
which favours short outputs; alpha around 0.6-1 evens that out. With beam_size = 1 this is
exactly greedy decoding (a test checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from tinylm.data.pairs import encode_source, pad
from tinylm.errors import UserError
from tinylm.tokenizer import Tokenizer


def length_penalty(n: int, alpha: float) -> float:
    """GNMT length normaliser for a hypothesis of n tokens (EOS included)."""
    return ((5 + n) / 6) ** alpha


def _limit(model, max_len: int) -> int:
    return max(1, min(max_len, model.config.block_size))


def _trim(row: Sequence[int], eos_id: int) -> list[int]:
    row = list(row)
    return row[: row.index(eos_id)] if eos_id in row else row


@torch.no_grad()
def greedy_search(model, src: torch.Tensor, bos_id: int, eos_id: int,
                  max_len: int = 64) -> list[list[int]]:
    """The most likely next token at every step. src (B, S) -> B id lists (no BOS/EOS)."""
    max_len = _limit(model, max_len)
    state = model.start(src, max_len)
    tokens = torch.full((src.shape[0],), bos_id, dtype=torch.long, device=src.device)
    done = torch.zeros_like(tokens, dtype=torch.bool)
    out = []
    for _ in range(max_len):
        tokens = model.step(state, tokens).argmax(-1)  # (B,)
        out.append(tokens)
        done |= tokens == eos_id
        if done.all():
            break
    rows = torch.stack(out, dim=1).tolist()  # (B, T)
    return [_trim(r, eos_id) for r in rows]


@torch.no_grad()
def beam_search(model, src: torch.Tensor, bos_id: int, eos_id: int, max_len: int = 64,
                beam_size: int = 4, alpha: float = 0.6) -> list[list[int]]:
    """The best-scoring translation per source row. src (B, S) -> B id lists (no BOS/EOS)."""
    if beam_size < 1:
        raise UserError(f"beam size {beam_size} must be at least 1")
    max_len = _limit(model, max_len)
    B, K = src.shape[0], beam_size
    device = src.device
    state = model.start(src, max_len)
    state.select(torch.arange(B, device=device).repeat_interleave(K))  # B*K rows
    tokens = torch.full((B * K,), bos_id, dtype=torch.long, device=device)
    seqs = torch.empty((B * K, 0), dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # all K start identical: expand only the first at step one
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B

    for t in range(max_len):
        logp = F.log_softmax(model.step(state, tokens).float(), dim=-1)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores[:, :, None] + logp.view(B, K, V)).view(B, K * V)
        top_s, top_i = cand.topk(min(2 * K, K * V), dim=-1)  # (B, 2K): K non-EOS survive
        top_s, top_i = top_s.tolist(), top_i.tolist()
        new_scores = torch.full((B, K), float("-inf"), device=device)
        new_beam = torch.zeros((B, K), dtype=torch.long)
        new_tok = torch.full((B, K), eos_id, dtype=torch.long)
        for b in range(B):
            if done[b]:
                continue
            j = 0
            for rank, (s, i) in enumerate(zip(top_s[b], top_i[b])):
                beam, tok = divmod(i, V)
                if s == float("-inf"):
                    break
                if tok == eos_id:
                    if rank < K:  # only EOS that would have made the beam counts
                        hyp = seqs[b * K + beam].tolist()
                        finished[b].append((s / length_penalty(t + 1, alpha), hyp))
                    continue
                new_scores[b, j], new_beam[b, j], new_tok[b, j] = s, beam, tok
                j += 1
                if j == K:
                    break
            done[b] = len(finished[b]) >= K
        if all(done):
            break
        rows = (torch.arange(B)[:, None] * K + new_beam).view(-1).to(device)
        state.select(rows)
        tokens = new_tok.view(-1).to(device)
        seqs = torch.cat([seqs[rows], tokens[:, None]], dim=1)
        scores = new_scores

    results = []
    for b in range(B):
        if not done[b]:  # out of steps: the unfinished beams compete as they are
            for k in range(K):
                s = scores[b, k].item()
                if s > float("-inf"):
                    finished[b].append((s / length_penalty(seqs.shape[1], alpha),
                                        seqs[b * K + k].tolist()))
        results.append(max(finished[b], key=lambda h: h[0])[1])
    return results


def decode(model, src: torch.Tensor, bos_id: int, eos_id: int, max_len: int = 64,
           beam_size: int = 1, alpha: float = 0.6) -> list[list[int]]:
    """Greedy when beam_size is 1, beam search otherwise."""
    if beam_size == 1:
        return greedy_search(model, src, bos_id, eos_id, max_len)
    return beam_search(model, src, bos_id, eos_id, max_len, beam_size, alpha)


def translate(model, src_tok: Tokenizer, tgt_tok: Tokenizer, texts: Sequence[str],
              beam_size: int = 4, alpha: float = 0.6, max_len: int = 0,
              batch_size: int = 64) -> list[str]:
    """Translate each text; max_len 0 = the model's block_size."""
    model.eval()
    device = next(model.parameters()).device
    ids = [encode_source(src_tok, t) for t in texts]
    limit = model.config.block_size
    too_long = [i for i, row in enumerate(ids) if len(row) > limit]
    if too_long and model.family == "transformer":
        raise UserError(f"source {too_long[0] + 1} has {len(ids[too_long[0]])} tokens, more "
                        f"than the model's block_size={limit}; shorten it")
    out: list[str] = []
    for i in range(0, len(ids), batch_size):
        src = pad(ids[i : i + batch_size], src_tok.pad_id).to(device)
        hyps = decode(model, src, tgt_tok.bos_id, tgt_tok.eos_id, max_len or limit,
                      beam_size, alpha)
        out += [tgt_tok.decode(h, skip_special=True) for h in hyps]
    return out
