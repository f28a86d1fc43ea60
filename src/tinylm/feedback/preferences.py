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
from tinylm.tokenizer import Tokenizer


def ranked_pairs_mask(ranks: torch.Tensor) -> torch.Tensor:
    """ranks: (B, K), 0 = best, equal = tied, -1 = no answer in this slot. Returns (B, K, K):
    [b, i, j] is True where answer i is ranked strictly above answer j (ties skipped)."""
    valid = ranks >= 0  # (B, K)
    above = ranks[:, :, None] < ranks[:, None, :]  # (B, K, K)
    return above & valid[:, :, None] & valid[:, None, :]


def sequence_logprobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The summed log-probability of each row's targets: x, y (B, T), y = -100 off the
    answer. Returns (B,)."""
    logp = torch.log_softmax(model(x).float(), dim=-1)  # (B, T, V)
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * (y != -100)).sum(-1)  # (B,)


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
    """One example per prompt: its answers' ids, end-of-answer positions and ranks."""

    def __init__(self, rows: list[RankingRow], tok: Tokenizer, template: str, block_size: int):
        self.examples: list[list[tuple[list[int], int, int]]] = []
        self.dropped_answers = self.dropped_prompts = 0
        self.pad_id = tok.pad_id
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

    def collate(self, picks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        return ids, end, ranks  # (B, K, T), (B, K), (B, K)

    def batch(self, B: int, gen: torch.Generator):
        return self.collate(torch.randint(len(self), (B,), generator=gen).tolist())

    def batches(self, B: int):
        for i in range(0, len(self), B):
            yield self.collate(range(i, min(i + B, len(self))))

    def n_pairs(self) -> int:
        return sum(1 for ex in self.examples for i, a in enumerate(ex) for b in ex[i + 1:]
                   if a[2] != b[2])


@torch.no_grad()
def reward_metrics(model: nn.Module, data: RankingData, batch_size: int) -> dict[str, float]:
    """Pairwise accuracy (the share of ordered held-out pairs whose better answer gets the
    higher reward; an equal reward counts half) and the mean margin r_better - r_worse."""
    device = next(model.parameters()).device
    right = total = 0.0
    margin = 0.0
    for ids, end, ranks in data.batches(batch_size):
        B, K, T = ids.shape
        r = model(ids.view(B * K, T).to(device), end.view(-1).to(device)).view(B, K).float()
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
    for ids, end, ranks in data.batches(batch_size):
        B, K, T = ids.shape
        r = model(ids.view(B * K, T).to(device), end.view(-1).to(device)).float()
        values.append(r[ranks.view(-1).to(device) >= 0])
    v = torch.cat(values)
    std = float(v.std()) if v.numel() > 1 else 1.0
    return float(v.mean()), std if std > 0 and math.isfinite(std) else 1.0


class PairData:
    """Every ordered pair of every ranking as (chosen, rejected) next-token examples whose
    targets are the answer's tokens only (-100 elsewhere), with the frozen reference's summed
    log-probs of both once `set_reference` has run."""

    def __init__(self, rows: list[RankingRow], tok: Tokenizer, template: str, block_size: int):
        self.pairs: list[tuple[chat.Rendered, chat.Rendered]] = []
        self.dropped_pairs = 0
        self.pad_id = tok.pad_id
        for row in rows:
            rendered = [render_answer(tok, template, row.messages, a) for a in row.answers]
            for i, j in row.pairs():
                if max(len(rendered[i].ids), len(rendered[j].ids)) > block_size + 1:
                    self.dropped_pairs += 1
                else:
                    self.pairs.append((rendered[i], rendered[j]))
        self.ref: torch.Tensor | None = None  # (N, 2): chosen, rejected

    def __len__(self) -> int:
        return len(self.pairs)

    def _xy(self, rows: list[chat.Rendered]) -> tuple[torch.Tensor, torch.Tensor]:
        T = max(len(r.ids) for r in rows) - 1
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), -100, dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.ids) - 1
            x[b, :n] = torch.tensor(r.ids[:-1])
            y[b, :n] = torch.tensor([t if m else -100 for t, m in zip(r.ids[1:], r.mask[1:])])
        return x, y  # (R, T) each

    def collate(self, picks) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (2B, T), y (2B, T), ref (2B,)): the B chosen rows, then the B rejected rows."""
        picks = list(picks)
        x, y = self._xy([self.pairs[i][0] for i in picks] + [self.pairs[i][1] for i in picks])
        if self.ref is None:
            raise UserError("PairData.set_reference(model) must run before batches are drawn")
        ref = torch.cat([self.ref[picks, 0], self.ref[picks, 1]])  # (2B,)
        return x, y, ref

    @torch.no_grad()
    def set_reference(self, model: nn.Module, batch_size: int = 16) -> None:
        """Summed log-probs of every pair's answers under `model` (the frozen reference)."""
        device = next(model.parameters()).device
        was = model.training
        model.eval()
        out = []
        for i in range(0, len(self), batch_size):
            picks = range(i, min(i + batch_size, len(self)))
            x, y = self._xy([self.pairs[p][0] for p in picks] + [self.pairs[p][1] for p in picks])
            lp = sequence_logprobs(model, x.to(device), y.to(device)).float().cpu()  # (2b,)
            out.append(lp.view(2, -1).T)  # (b, 2)
        model.train(was)
        self.ref = torch.cat(out) if out else torch.zeros((0, 2))

    def batch(self, B: int, gen: torch.Generator):
        return self.collate(torch.randint(len(self), (B,), generator=gen).tolist())

    def batches(self, B: int):
        for i in range(0, len(self), B):
            yield self.collate(range(i, min(i + B, len(self))))
