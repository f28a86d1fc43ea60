"""How well a chat model does what it is asked, on held-out requests (data/make_chat.py):

- assistant-token loss (the SFT objective) on the held-out conversations;
- request-following rate: the share of story requests whose greedy answer names the requested
  character and the requested object and ends with a finished sentence;
- translation chrF of the greedy answers to "Translate to French: ..." requests.

`plain=True` asks a pre-trained (not fine-tuned) model the same requests as plain text (the
request, then a new line), the baseline SFT is measured against.
"""

from __future__ import annotations

import torch

from tinylm.data import chat
from tinylm.eval.translation import score
from tinylm.feedback.guidelines import follows_request
from tinylm.infer.chat import turn_end_ids
from tinylm.infer.engine import Engine, SamplingParams


@torch.no_grad()
def assistant_loss(model, data: chat.ChatData, batch_size: int) -> float:
    """Mean loss per assistant token over `data` (no graph: it only measures)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in data.batches(batch_size):
        n = int((y != -100).sum())
        total += model(x.to(device), y.to(device)).item() * n
        count += n
    return total / max(count, 1)


def answers(engine: Engine, requests: list[str], template: str | None,
            max_new_tokens: int) -> list[str]:
    """Greedy answers to single-turn requests, through the chat template (or as plain text
    when `template` is None)."""
    if template is None:
        prompts: list = [r + "\n" for r in requests]
        stops: list[int] = []
    else:
        prompts = [chat.render(engine.tok, [{"role": "user", "content": r}], template,
                               add_generation_prompt=True).ids for r in requests]
        stops = turn_end_ids(engine.tok, template)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0,
                            stop_token_ids=stops, truncate=True)
    return [c.text for c in engine.generate(prompts, params)]


def chat_metrics(engine: Engine, rows: list[dict], template: str | None,
                 max_new_tokens: int = 96) -> dict:
    """The metrics of the module docstring on held-out `rows` (make_chat's JSONL rows);
    assistant_loss only through a chat template, since plain text has no assistant turns."""
    stories = [r for r in rows if r.get("task") == "story"]
    trans = [r for r in rows if r.get("task") == "translate"]
    out: dict = {}
    tok, block = engine.tok, engine.model.config.block_size
    max_new_tokens = max(1, min(max_new_tokens, block - 32))  # leave the request some room
    if template is not None:  # the SFT objective on conversations never trained on
        held = chat.ChatData([chat.render(tok, r["messages"], template) for r in rows], block,
                             tok.pad_id)
        out["assistant_loss"] = assistant_loss(engine.model, held, 16)
    if stories:
        got = answers(engine, [r["messages"][0]["content"] for r in stories], template,
                      max_new_tokens)
        ok = [follows_request(a, r["name"], r["object"]) for a, r in zip(got, stories)]
        out |= {"stories": len(stories), "request_following": sum(ok) / len(ok),
                "samples": [{"request": r["messages"][0]["content"], "answer": a, "ok": k}
                            for r, a, k in list(zip(stories, got, ok))[:5]]}
    if trans:
        got = answers(engine, [r["messages"][0]["content"] for r in trans], template,
                      min(32, max_new_tokens))
        out |= {"translations": len(trans),
                "chrf": score([a.strip() for a in got], [r["refs"] for r in trans])["chrf"]}
    return out
