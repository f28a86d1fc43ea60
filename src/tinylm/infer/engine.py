"""Text generation. (The fast KV-cache engine builds on these pieces.)

`naive_generate` runs the whole model over the whole sequence at every step: slow, obviously
correct, and kept as the reference the engine is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tinylm.errors import UserError


@dataclass
class SamplingParams:
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.max_new_tokens < 0:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be >= 0")


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p (nucleus) applied to (B, V) logits."""
    logits = logits / max(p.temperature, 1e-8)
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= p.top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def pick(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V)."""
    if p.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits.float(), p).softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def naive_generate(model, idx: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, T) prompt ids -> (B, T + max_new_tokens); the full forward pass at every step."""
    gen = torch.Generator(idx.device).manual_seed(p.seed) if p.seed is not None else None
    block = model.config.block_size
    for _ in range(p.max_new_tokens):
        logits = model(idx[:, -block:])[:, -1]
        idx = torch.cat([idx, pick(logits, p, gen)[:, None]], dim=1)
    return idx
