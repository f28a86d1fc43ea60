"""Look inside a language model: what it thinks comes next, and how sure it is."""

from __future__ import annotations

import math

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


def token_label(tok, i: int) -> str:
    """How token `i` reads on its own: its text, or its vocabulary entry when it is a piece
    of a character (a byte token) or a special token with no text."""
    text = tok.decode([i])
    if not text or "\ufffd" in text:
        text = tok.id_to_token(i)
    return repr(text)


def explain_sample(engine, prompt: str, params, k: int = 5):
    """Generate from `prompt` and keep, for every step, the model's probability of the chosen
    token and its k runners-up; returns the Completion and a table to print."""
    import dataclasses

    params = dataclasses.replace(params, logprobs=True, top_logprobs=min(k + 1, 20))
    completion = engine.generate([prompt], params)[0]
    return completion, format_steps(engine.tok, completion, k)


def format_steps(tok, completion, k: int = 5) -> str:
    """One line per generated token: step, token, probability, bar, runners-up."""
    rows = []
    for step, (t, lp, top) in enumerate(
            zip(completion.token_ids, completion.logprobs, completion.top_logprobs), 1):
        others = [(i, math.exp(v)) for i, v in top if i != t][:k]
        rows.append((step, token_label(tok, t), math.exp(lp),
                     "  ".join(f"{token_label(tok, i)} {p:.1%}" for i, p in others)))
    width = max([8] + [len(label) for _, label, _, _ in rows])
    lines = [f"{'step':>4}  {'token':<{width}}  {'prob':>6}  {'':<10}  runners-up",
             "-" * (width + 40)]
    for step, label, p, others in rows:
        bar = "#" * round(p * 10)
        lines.append(f"{step:>4}  {label:<{width}}  {p:>6.1%}  {bar:<10}  {others}")
    return "\n".join(lines)
