"""Rankings as tensors: batch elements for the reward model (a prompt's K answers together) and
for DPO (chosen/rejected pairs), rendered through the one chat renderer (data/chat.py) with
the run's template; and how well a model orders held-out answers.

An answer is rendered as the conversation `prompt turns + {"role": "assistant", "content":
answer}`; its end-of-answer token is the last token of the assistant mask (the template's
end-of-turn token, tinylm's <|end|>), where the reward model reads its score. An answer whose
rendering does not fit the model's window is dropped (its end token would be cut off); a
prompt left with no ordered pair is dropped too, and both are counted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tinylm.data import chat
from tinylm.data.split import held_out
from tinylm.errors import UserError
from tinylm.feedback.io import RankingRow
from tinylm.infer.fast import FastGPT
from tinylm.models.gpt import GPT
from tinylm.models.layers import Packed
from tinylm.tokenizer import Tokenizer


def ranked_pairs_mask(ranks: torch.Tensor) -> torch.Tensor:
    """ranks: (B, K), 0 = best, equal = tied, -1 = no answer in this slot. Returns (B, K, K):
    [b, i, j] is True where answer i is ranked strictly above answer j (ties skipped)."""
    valid = ranks >= 0  # (B, K)
    above = ranks[:, :, None] < ranks[:, None, :]  # (B, K, K)
    return above & valid[:, :, None] & valid[:, None, :]


def logits_at(model: nn.Module | FastGPT, ids: torch.Tensor, rows: torch.Tensor,
              pos: torch.Tensor, packed: Packed | None = None) -> torch.Tensor:
    """(n, V) logits at positions (rows, pos) of `ids` (N, L): the trunk runs on every
    position (of `packed`, ids' rows with shared prompts once, when given to a GPT), the head
    only on these. A GPT (or its FastGPT twin) is cut between the two; any other module (a
    DDP or compiled wrapper, whose own forward must run for its gradient hooks) gives all its
    logits and the rows are picked from them."""
    if isinstance(model, (FastGPT, GPT)):
        return model.logits(hidden_states(model, ids, packed)[rows, pos])
    return model(ids)[rows, pos]  # (n, V) of (N, L, V)


def hidden_states(model: GPT | FastGPT, ids: torch.Tensor, packed: Packed | None = None
                  ) -> torch.Tensor:
    """The last block's normed output (N, L, C) for a full batch of ids (N, L), from a GPT
    (through `packed` if given) or its FastGPT twin (which takes a fresh cache to fill)."""
    if isinstance(model, FastGPT):
        return model.hidden_states(ids, model.new_cache(*ids.shape))
    if ids.shape[1] > model.config.block_size:  # what GPT.forward refuses
        raise ValueError(f"sequence of {ids.shape[1]} tokens is longer than block_size="
                         f"{model.config.block_size}")
    return model.hidden_states(ids, packed=packed)


class _TokenLogprobs(torch.autograd.Function):
    """log p(target) (n,) of each row of logits (n, V), in fp32, and when asked the rows'
    entropies (n,), which carry no gradient. It keeps one (n, V) tensor, p = softmax(logits),
    for a backward of one pass over it, d log p(t) / d logits = onehot(t) - p, where autograd
    ran four (the gather's zeros and scatter, the log-softmax's backward, the cast from bf16),
    and the forward reads bf16 logits into fp32 inside the log-softmax, not as a copy first.
    A GRPO update's (1828, 4096) bf16 logits with entropies: 47 -> 33 ms forward and backward
    (the two run alternately in one process, 2 threads, Intel Xeon with AMX)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, entropy: bool):
        logp_all = torch.log_softmax(logits, -1, dtype=torch.float32)  # (n, V)
        logp = logp_all.gather(-1, targets[:, None])[:, 0]  # (n,)
        ent = None
        if entropy:  # H = -sum p log p, as a dot product per row (no (n, V) product)
            p = logp_all.exp()
            ent = -torch.linalg.vecdot(p, logp_all)
        else:
            p = logp_all.exp_()
        ctx.save_for_backward(p, targets)
        ctx.dtype = logits.dtype
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor, _):
        p, targets = ctx.saved_tensors
        grad = p.mul_(-g[:, None])  # p is not needed again: its memory becomes the gradient
        grad[torch.arange(len(targets), device=grad.device), targets] += g
        return grad.to(ctx.dtype), None, None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, entropy: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log p(target) (n,) of each row of logits (n, V) in fp32, the rows' entropies (n,),
    without gradient, when asked, else None): `_TokenLogprobs`."""
    return _TokenLogprobs.apply(logits, targets, entropy)


def sequence_logprobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: int = 1,
                      packed: Packed | None = None) -> torch.Tensor:
    """The summed log-probability of each row's targets: x, y (B, T), y = -100 off the
    answer. Returns (B,).

    `packed` (x's rows with each shared prompt once, layers.Packed) runs the trunk on fewer
    positions; without it, `groups` > 1 sorts the rows by where their targets end and
    forwards them in that many groups, each cut after its own last target: the model is
    causal, so the tokens after a row's last target change none of its numbers, and a batch
    of rows of mixed lengths runs on fewer padded positions (the time of a CPU forward is
    about proportional to them).

    The head runs only at the target positions (`logits_at`: the answers, a fraction of the
    padded batch), and so does the log-softmax: no (B, T, V) tensor is made."""
    keep = y != -100  # (B, T)
    if groups > 1 and x.shape[0] > 1 and packed is None:
        ends = (keep * torch.arange(1, x.shape[1] + 1, device=x.device)).amax(-1)  # (B,)
        order = ends.argsort()  # (B,)
        parts = []
        for g in order.tensor_split(min(groups, x.shape[0])):  # rows of similar lengths
            t = max(int(ends[g].max()), 1)
            parts.append(sequence_logprobs(model, x[g, :t], y[g, :t]))  # (len(g),)
        return torch.cat(parts)[order.argsort()]  # (B,) in the rows' order
    rows, pos = keep.nonzero(as_tuple=True)  # (N,) each: the target positions
    logits = logits_at(model, x, rows, pos, packed)  # (N, V)
    picked = token_logprobs(logits, y[rows, pos])[0]  # (N,)
    return torch.zeros(x.shape[0], dtype=picked.dtype, device=x.device).index_add(0, rows,
                                                                                  picked)


def render_answer(tok: Tokenizer, template: str, messages: list[dict], answer: str
                  ) -> chat.Rendered:
    return chat.render(tok, [*messages, {"role": "assistant", "content": answer}], template)


def split_rows(rows: list[RankingRow], val_fraction: float, seed: int
               ) -> tuple[list[RankingRow], list[RankingRow]]:
    """(train, held-out) by prompt: every ranking of one prompt falls on the same side, so
    held-out accuracy is measured on prompts the model never saw ranked."""
    keys = sorted({chat_key(r.messages) for r in rows})
    held = held_out(keys, val_fraction, seed, "prompts")
    return ([r for r in rows if chat_key(r.messages) not in held],
            [r for r in rows if chat_key(r.messages) in held])


def chat_key(messages: list[dict]) -> str:
    return "\n".join(f"{m['role']}:{m['content']}" for m in messages)


class RankingData:
    """One example per prompt: its answers' ids, end-of-answer positions and ranks. With
    `pack`, a batch also carries its answers packed with their prompt once (layers.Packed):
    the reward model computes the same rewards on about 40% fewer positions."""

    def __init__(self, rows: list[RankingRow], tok: Tokenizer, template: str, block_size: int,
                 pack: bool = True):
        self.examples: list[list[tuple[list[int], int, int]]] = []
        self.dropped_answers = self.dropped_prompts = 0
        self.pad_id = tok.pad_id
        self.pack = pack
        for row in rows:
            items = []
            for answer, rank in zip(row.answers, row.ranks):
                r = render_answer(tok, template, row.messages, answer)
                if len(r.ids) > block_size:
                    self.dropped_answers += 1
                    continue
                items.append((r.ids, max(i for i, m in enumerate(r.mask) if m), rank))
            if len({rank for *_, rank in items}) >= 2:
                self.examples.append(items)
            else:
                self.dropped_prompts += 1

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, picks) -> tuple[torch.Tensor, ...] | tuple[torch.Tensor, ..., Packed]:
        """(ids (B, K, T), end (B, K), ranks (B, K)), and with `pack` the Packed layout of
        ids.view(B * K, T) (a missing answer, rank -1, is a one-token row of padding)."""
        rows = [self.examples[i] for i in picks]
        K = max(len(r) for r in rows)
        T = max(len(ids) for r in rows for ids, _, _ in r)
        ids = torch.full((len(rows), K, T), self.pad_id, dtype=torch.long)
        end = torch.zeros((len(rows), K), dtype=torch.long)
        ranks = torch.full((len(rows), K), -1, dtype=torch.long)  # -1: no answer here
        for b, row in enumerate(rows):
            for k, (x, e, rank) in enumerate(row):
                ids[b, k, : len(x)] = torch.tensor(x)
                end[b, k], ranks[b, k] = e, rank
        if not self.pack:
            return ids, end, ranks
        seqs = [row[k][0] if k < len(row) else [self.pad_id] for row in rows for k in range(K)]
        groups = [g for b, row in enumerate(rows)  # a prompt's answers; a missing one alone
                  for g in ([b * K + k for k in range(len(row))],
                            *([b * K + k] for k in range(len(row), K)))]
        return ids, end, ranks, Packed.pack(seqs, groups, T, self.pad_id)

    def batch(self, B: int, gen: torch.Generator):
        return self.collate(torch.randint(len(self), (B,), generator=gen).tolist())

    def batches(self, B: int):
        for i in range(0, len(self), B):
            yield self.collate(range(i, min(i + B, len(self))))

    def n_pairs(self) -> int:
        return sum(1 for ex in self.examples for i, a in enumerate(ex) for b in ex[i + 1:]
                   if a[2] != b[2])


def reward_forward(model: nn.Module, ids: torch.Tensor, end: torch.Tensor,
                   packed: list[Packed], device: torch.device) -> torch.Tensor:
    """The rewards (B, K) of a RankingData batch (ids (B, K, T), end (B, K), and its Packed
    layout as a list of one, or none)."""
    B, K, T = ids.shape
    layout = packed[0].to(device) if packed else None
    return model(ids.view(B * K, T).to(device), end.view(-1).to(device), layout).view(B, K)


@torch.no_grad()
def reward_metrics(model: nn.Module, data: RankingData, batch_size: int) -> dict[str, float]:
    """Pairwise accuracy (the share of ordered held-out pairs whose better answer gets the
    higher reward; an equal reward counts half) and the mean margin r_better - r_worse."""
    device = next(model.parameters()).device
    right = total = 0.0
    margin = 0.0
    for ids, end, ranks, *packed in data.batches(batch_size):
        r = reward_forward(model, ids, end, packed, device).float()  # (B, K)
        pairs = ranked_pairs_mask(ranks.to(device))  # (B, K, K)
        diff = (r[:, :, None] - r[:, None, :])[pairs]  # (P,)
        right += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        margin += float(diff.sum())
        total += diff.numel()
    if not total:
        return {}
    return {"val_accuracy": right / total, "val_margin": margin / total, "val_pairs": total}


@torch.no_grad()
def reward_stats(model: nn.Module, data: RankingData, batch_size: int) -> tuple[float, float]:
    """Mean and standard deviation of the rewards of every answer in `data`."""
    device = next(model.parameters()).device
    values = []
    for ids, end, ranks, *packed in data.batches(batch_size):
        r = reward_forward(model, ids, end, packed, device).float()  # (B, K)
        values.append(r[ranks.to(device) >= 0])
    v = torch.cat(values)
    std = float(v.std()) if v.numel() > 1 else 1.0
    return float(v.mean()), std if std > 0 and math.isfinite(std) else 1.0


class PairData:
    """Every ordered pair of every ranking (ties skipped) as (chosen, rejected), kept with its
    ranking, over the rankings' distinct answers: next-token rows whose targets are the
    answer's tokens only (-100 elsewhere), and the frozen reference's summed log-probs of each
    answer once `set_reference` has run.

    A batch holds each of its distinct answers once. Its B pairs are drawn independently, or
    `by_ranking` (all the pairs of randomly drawn rankings, a random part of the last one's to
    make B): with K = 4 answers a ranking gives up to 6 pairs but only 4 rows, where B
    independent pairs forward nearly 2B rows. The loss of a pair is the same either way; by
    ranking, the pairs of a step come from fewer prompts (stages/dpo.py has the trade-off)."""

    def __init__(self, rows: list[RankingRow], tok: Tokenizer, template: str, block_size: int,
                 pack: bool = True):
        self.answers: list[chat.Rendered] = []
        self.ranking_of: list[int] = []  # per answer: its ranking (index into groups)
        self.pairs: list[tuple[int, int]] = []  # (chosen, rejected) indices into answers
        self.groups: list[list[int]] = []  # per ranking with a pair: indices into pairs
        self.dropped_pairs = 0
        self.pad_id = tok.pad_id
        self.pack = pack  # batches carry the Packed layout of their rows (each prompt once)
        for row in rows:
            rendered = [render_answer(tok, template, row.messages, a) for a in row.answers]
            fits = [len(r.ids) <= block_size + 1 for r in rendered]
            kept = [(i, j) for i, j in row.pairs() if fits[i] and fits[j]]
            self.dropped_pairs += len(row.pairs()) - len(kept)
            if kept:
                self._add(rendered, kept)
        self.ref: torch.Tensor | None = None  # (A,): per answer

    def _add(self, rendered: list[chat.Rendered], kept: list[tuple[int, int]]) -> None:
        where = {}
        for i in sorted({i for pair in kept for i in pair}):
            where[i] = len(self.answers)
            self.answers.append(rendered[i])
            self.ranking_of.append(len(self.groups))
        self.groups.append(list(range(len(self.pairs), len(self.pairs) + len(kept))))
        self.pairs += [(where[i], where[j]) for i, j in kept]

    def __len__(self) -> int:
        return len(self.pairs)

    def _xy(self, rows: list[chat.Rendered]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(r.ids) for r in rows) - 1  # the longest row, not block_size
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.ids) - 1
            x[b, :n] = torch.tensor(r.ids[:-1])
            y[b, :n] = torch.tensor([t if m else -100 for t, m in zip(r.ids[1:], r.mask[1:])])
        return x, y  # (R, T) each

    def collate(self, picks) -> tuple[torch.Tensor, ...] | tuple[torch.Tensor, ..., Packed]:
        """(x (R, T), y (R, T), ref (R,), chosen (B,), rejected (B,)): the R distinct answers
        of the B picked pairs, and each pair's two rows among them; with `pack`, then the
        Packed layout of x (the answers of one ranking share its prompt)."""
        picks = list(picks)
        if self.ref is None:
            raise UserError("PairData.set_reference(model) must run before batches are drawn")
        answers = sorted({a for p in picks for a in self.pairs[p]})
        row = {a: r for r, a in enumerate(answers)}
        x, y = self._xy([self.answers[a] for a in answers])
        chosen = torch.tensor([row[self.pairs[p][0]] for p in picks])  # (B,)
        rejected = torch.tensor([row[self.pairs[p][1]] for p in picks])  # (B,)
        batch = x, y, self.ref[answers], chosen, rejected
        if not self.pack:
            return batch
        by_ranking: dict[int, list[int]] = {}
        for r, a in enumerate(answers):
            by_ranking.setdefault(self.ranking_of[a], []).append(r)
        seqs = [self.answers[a].ids[:-1] for a in answers]
        return *batch, Packed.pack(seqs, list(by_ranking.values()), x.shape[1], self.pad_id)

    @torch.no_grad()
    def set_reference(self, model: nn.Module, batch_size: int = 16) -> None:
        """Summed log-probs of every answer under `model` (the frozen reference), `2 *
        batch_size` answers a forward, in order of length (less padding)."""
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        order = sorted(range(len(self.answers)), key=lambda a: len(self.answers[a].ids))
        self.ref = torch.zeros(len(self.answers))
        for i in range(0, len(order), 2 * batch_size):
            part = order[i : i + 2 * batch_size]
            x, y = self._xy([self.answers[a] for a in part])
            self.ref[part] = sequence_logprobs(model, x.to(device), y.to(device)).float().cpu()
        model.train(was)

    def batch(self, B: int, gen: torch.Generator, by_ranking: bool = False):
        """B pairs drawn independently (TRL's way: nearly 2B rows); or `by_ranking`, the pairs
        of rankings in a random order (again from the start if B is more than all of them), the
        last ranking's cut to a random part of them."""
        if not self.groups:
            raise UserError("no ordered pair to draw a batch from")
        if not by_ranking:
            return self.collate(torch.randint(len(self), (B,), generator=gen).tolist())
        picks: list[int] = []
        while len(picks) < B:
            for g in torch.randperm(len(self.groups), generator=gen).tolist():
                group = self.groups[g]
                if len(picks) + len(group) > B:
                    cut = torch.randperm(len(group), generator=gen)[: B - len(picks)]
                    group = [group[c] for c in cut.tolist()]
                picks += group
                if len(picks) == B:
                    break
        return self.collate(picks)

    def batches(self, B: int):
        """Every pair once, B at a time, in order (a ranking's pairs stay together)."""
        for i in range(0, len(self), B):
            yield self.collate(range(i, min(i + B, len(self))))
