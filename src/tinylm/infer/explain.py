"""Look inside a language model: what it thinks comes next, and how sure it is."""

from __future__ import annotations

import torch

from tinylm.errors import UserError


@torch.no_grad()
def next_token_table(model, tok, text: str, k: int = 10) -> list[tuple[str, float]]:
    """The k most likely next tokens after `text`, with their probabilities."""
    ids = tok.encode(text)
    if not ids:
        raise UserError("the prompt is empty; give some text, e.g. 'The sun is'")
    block = model.config.block_size
    x = torch.tensor([ids[-block:]], device=next(model.parameters()).device)
    probs = model(x)[0, -1].float().softmax(-1)
    top = torch.topk(probs, min(k, probs.numel()))
    return [(tok.decode([i]), p) for i, p in zip(top.indices.tolist(), top.values.tolist())]


def format_table(rows: list[tuple[str, float]]) -> str:
    width = max(8, *(len(repr(t)) for t, _ in rows))
    lines = [f"{'rank':>4}  {'token':<{width}}  probability", "-" * (width + 21)]
    for i, (t, p) in enumerate(rows, 1):
        bar = "#" * max(1, round(p * 30)) if p >= 0.005 else ""
        lines.append(f"{i:>4}  {repr(t):<{width}}  {p:>10.2%}  {bar}")
    return "\n".join(lines)
