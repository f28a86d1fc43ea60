"""`tinylm eval winrate`: run A against run B on the same prompts, judged answer by answer.

    winrate("runs/dpo", "runs/sft-tinystories", judge="request",
            prompts="runs/chat/chat-heldout.jsonl")

Both runs answer every prompt through their own chat template and the one engine (greedy by
default, so the comparison is not a coin toss of sampling). A judge scores each answer:
a guideline labeler (`request`, `sentiment`, `textblob`: feedback/labelers.py) or a trained
reward model (`reward:RUN`, its raw score at the end-of-answer token). A's answer wins when
its score is higher; scores equal at the labeler's resolution are ties. Reported: win, tie
and loss counts, the win rate (ties count half), mean judge score and mean length in words of
each side.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

import tinylm
from tinylm import rundir
from tinylm.data import chat
from tinylm.feedback import labelers
from tinylm.feedback.collect import PromptRow, read_prompts
from tinylm.feedback.preferences import render_answer
from tinylm.infer.chat import turn_end_ids
from tinylm.infer.engine import Engine, SamplingParams


def answers(run: str | Path, rows: list[PromptRow], max_new_tokens: int = 96,
            temperature: float = 0.0, seed: int = 0, dtype: str | None = "auto") -> list[str]:
    """One answer of chat run `run` to every prompt (greedy when temperature is 0)."""
    model, tok = tinylm.load(run, family="gpt")
    template = rundir.chat_template(Path(run), required=True)
    engine = Engine(model, tok, dtype=dtype)
    ids = [chat.render(tok, r.messages, template, add_generation_prompt=True).ids for r in rows]
    stops = turn_end_ids(tok, template)
    params = [SamplingParams(max_new_tokens=min(max_new_tokens, engine.block_size - len(x)),
                             temperature=temperature, seed=seed + i, stop_token_ids=stops,
                             truncate=True) for i, x in enumerate(ids)]
    return [c.text.strip() for c in engine.generate(ids, params)]


def reward_judge(run: str | Path) -> Callable[[str, dict], float]:
    """score(answer, prompt row) by the reward model in `run`."""
    model, tok = tinylm.load(run, family="reward")
    template = rundir.chat_template(Path(run), required=True)

    @torch.no_grad()
    def score(answer: str, row: dict) -> float:
        r = render_answer(tok, template, row["messages"], answer)
        ids = r.ids[-model.config.block_size:]
        end = max(i for i, m in enumerate(r.mask[-len(ids):]) if m)
        return float(model(torch.tensor([ids]), torch.tensor([end]))[0])

    return score


def judge_of(spec: str) -> tuple[Callable[[str, dict], float], float, Callable[[dict], bool]]:
    """(score function, tie resolution, which prompts it can judge) for a --judge value."""
    if spec.startswith("reward:"):
        return reward_judge(spec.removeprefix("reward:")), 0.0, lambda row: True
    lab = labelers.get(spec)
    return lab.score, lab.resolution, lab.can_judge


def compare(scores_a: list[float], scores_b: list[float], resolution: float) -> dict:
    def key(s: float) -> float:
        return round(s / resolution) if resolution else s

    win = sum(key(a) > key(b) for a, b in zip(scores_a, scores_b))
    loss = sum(key(a) < key(b) for a, b in zip(scores_a, scores_b))
    n = len(scores_a)
    return {"win": win, "tie": n - win - loss, "loss": loss,
            "win_rate": (win + 0.5 * (n - win - loss)) / n if n else float("nan")}


def winrate(a: str | Path, b: str | Path, judge: str = "request",
            prompts: str | Path = "runs/chat/chat-heldout.jsonl", limit: int = 0,
            max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 0) -> dict:
    """Win/tie/loss of run `a` against run `b` by `judge` on `prompts`, with mean scores and
    lengths. judge: request | sentiment | textblob | reward:RUN."""
    score, resolution, can_judge = judge_of(judge)
    rows = read_prompts(prompts, keep=lambda r: can_judge(r.row), limit=limit)
    got = {side: answers(run, rows, max_new_tokens, temperature, seed)
           for side, run in (("a", a), ("b", b))}
    scores = {side: [score(x, r.row) for x, r in zip(texts, rows)]
              for side, texts in got.items()}
    out = {"a": str(a), "b": str(b), "judge": judge, "prompts": len(rows),
           **compare(scores["a"], scores["b"], resolution)}
    for side in ("a", "b"):
        out[f"score_{side}"] = sum(scores[side]) / len(rows)
        out[f"length_{side}"] = sum(len(x.split()) for x in got[side]) / len(rows)
    return out
