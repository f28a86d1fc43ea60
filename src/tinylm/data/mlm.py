"""Masked-LM inputs: BERT's masking recipe (Devlin et al. 2018, section 3.1).

Of the real tokens (never padding or other special tokens), `prob` (15%) are chosen; of the
chosen, 80% become <|mask|>, 10% a random real token and 10% stay as they are. The model must
predict the original token at every chosen position, so it cannot learn that only <|mask|>
positions matter, and the representation of every token has to carry its own identity.

Masks are drawn fresh for every batch (dynamic masking, as RoBERTa) from the per-step
generator, so a resumed run sees exactly the masks it would have seen, and evaluation reuses
one fixed seed so every eval scores the same masked positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinylm.tokenizer import SPECIAL_TOKENS, Tokenizer

IGNORE = -100  # target at positions that carry no loss (F.cross_entropy's ignore_index)


@dataclass
class MaskingConfig:
    prob: float = 0.15  # fraction of real tokens the model must predict
    mask: float = 0.8  # of those: replaced by <|mask|>
    random: float = 0.1  # of those: replaced by a random real token (the rest stay unchanged)
    eval_seed: int = 1234  # masks of the held-out windows: the same at every evaluation

    def __post_init__(self):
        if not 0 < self.prob < 1:
            raise ValueError(f"prob={self.prob} must be between 0 and 1")
        if self.mask < 0 or self.random < 0 or self.mask + self.random > 1:
            raise ValueError(f"mask={self.mask} and random={self.random} must be >= 0 and sum "
                             "to at most 1 (the rest are kept unchanged)")


class Masker:
    """Turns token windows into (inputs, targets) for the masked-LM loss."""

    def __init__(self, tok: Tokenizer, cfg: MaskingConfig | None = None):
        self.cfg = cfg or MaskingConfig()
        self.mask_id = tok.mask_id
        self.special = torch.tensor(sorted(tok.special_id(t) for t in SPECIAL_TOKENS))
        real = torch.ones(tok.vocab_size, dtype=torch.bool)
        real[self.special] = False
        self.real_ids = real.nonzero().squeeze(1)  # what a "random token" is drawn from

    def __call__(self, ids: torch.Tensor, gen: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """ids: (B, T) int64 token ids. Returns inputs (B, T) with the chosen positions
        corrupted, and targets (B, T): the original id there, IGNORE everywhere else."""
        c = self.cfg
        candidate = ~torch.isin(ids, self.special)  # (B, T) real tokens only
        u = torch.rand(ids.shape, generator=gen)
        chosen = candidate & (u < c.prob)
        # A row with nothing chosen would give no loss (and an empty batch a NaN mean):
        # choose its candidate with the smallest draw, as BERT chooses at least one.
        empty = ~chosen.any(dim=1) & candidate.any(dim=1)  # (B,)
        if bool(empty.any()):
            first = u.masked_fill(~candidate, 2.0).argmin(dim=1)  # (B,)
            rows = empty.nonzero().squeeze(1)
            chosen[rows, first[rows]] = True
        # One more uniform draw splits the chosen into mask / random / keep.
        v = torch.rand(ids.shape, generator=gen)
        to_mask = chosen & (v < c.mask)
        to_random = chosen & (v >= c.mask) & (v < c.mask + c.random)
        random_ids = self.real_ids[torch.randint(len(self.real_ids), ids.shape, generator=gen)]
        inputs = ids.clone()
        inputs[to_mask] = self.mask_id
        inputs[to_random] = random_ids[to_random]
        targets = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
        return inputs, targets
