"""Error analysis of a `request` reward model on its held-out pairs (docs/rlhf.md, "Why the
reward model plateaued"): which of the labeler's checks separates each pair, how often the
model orders each kind right, how it does by the number of tokens of the requested name, and
whether it reads the prompt at all (its rewards for the same answers under another request).

    python benchmarks/reward_errors.py --run runs/rm-eng/sum-f0 --data runs/rmx/rankings.jsonl

The held-out split is the reward stage's (the run's data.heldout file, or `split_rows` with
its val_fraction and split_seed), so the pairs are the ones `val_accuracy` counted.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import torch

import tinylm
from tinylm import config as configlib
from tinylm import rundir
from tinylm.feedback import guidelines as g
from tinylm.feedback.io import read_rankings
from tinylm.feedback.labelers import request_score
from tinylm.feedback.preferences import render_answer, split_rows
from tinylm.stages.reward import RewardStageConfig

CHECKS = ("name", "object", "finished", "no repeat", "length")


def checks(answer: str, name: str, obj: str) -> tuple:
    return (g.names_character(answer, name), g.names_object(answer, obj),
            g.ends_finished(answer), not g.repeats_a_sentence(answer), g.length_score(answer))


@torch.no_grad()
def rewards(model, tok, template: str, messages: list[dict], answers: list[str]) -> list[float]:
    rendered = [render_answer(tok, template, messages, a) for a in answers]
    T = max(len(r.ids) for r in rendered)
    ids = torch.full((len(rendered), T), tok.pad_id, dtype=torch.long)
    for k, r in enumerate(rendered):
        ids[k, : len(r.ids)] = torch.tensor(r.ids)
    end = torch.tensor([max(i for i, m in enumerate(r.mask) if m) for r in rendered])
    return model(ids, end).tolist()


def corr(a: list[float], b: list[float]) -> float:
    return float(torch.corrcoef(torch.tensor([a, b]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a `tinylm reward` run")
    ap.add_argument("--data", required=True, help="the rankings it was trained on")
    args = ap.parse_args()
    cfg = configlib.load(RewardStageConfig, str(Path(args.run) / "config.toml"))
    model, tok = tinylm.load(args.run, family="reward")
    model.eval()
    template = rundir.chat_template(Path(args.run), required=True)
    if cfg.data.heldout:  # a held-out file of its own (data.heldout)
        held = read_rankings(cfg.data.heldout)
    else:
        _, held = split_rows(read_rankings(args.data), cfg.data.val_fraction,
                             cfg.data.split_seed)
    by_kind, wrong, by_tokens, wrong_tokens = Counter(), Counter(), Counter(), Counter()
    own, other, gold_own, gold_other = [], [], [], []
    rng = random.Random(0)
    for row in held:
        name, obj = row.meta["name"], row.meta["object"]
        r = rewards(model, tok, template, row.messages, row.answers)
        c = [checks(a, name, obj) for a in row.answers]
        for i, j in row.pairs():
            kind = "+".join(n for n, x, y in zip(CHECKS, c[i], c[j]) if x != y)
            by_kind[kind] += 1
            wrong[kind] += r[i] <= r[j]
            if kind == "name":
                n = min(len(tok.encode(" " + name)), 3)
                by_tokens[n] += 1
                wrong_tokens[n] += r[i] <= r[j]
        swap = rng.choice([x for x in held if x.meta["name"] != name
                           and x.meta["object"] != obj])
        other += rewards(model, tok, template, swap.messages, row.answers)
        own += r
        gold_own += [request_score(a, row.meta) for a in row.answers]
        gold_other += [request_score(a, swap.meta) for a in row.answers]
    report(by_kind, wrong, by_tokens, wrong_tokens)
    print(f"\nsame answers under another request: rewards correlate {corr(own, other):.2f}, "
          f"the labeler's scores {corr(gold_own, gold_other):.2f}")


def report(by_kind: Counter, wrong: Counter, by_tokens: Counter, wrong_tokens: Counter
           ) -> None:
    total = sum(by_kind.values())
    print("| checks that differ | pairs | ordered right |\n|---|---:|---:|")
    for kind, n in by_kind.most_common():
        print(f"| {kind} | {n} | {1 - wrong[kind] / n:.3f} |")
    print(f"| all | {total} | {1 - sum(wrong.values()) / total:.3f} |")
    print("\n| name-only pairs: tokens in the name | pairs | ordered right |\n|---|---:|---:|")
    for n in sorted(by_tokens):
        label = f"{n}+" if n == 3 else str(n)
        print(f"| {label} | {by_tokens[n]} | {1 - wrong_tokens[n] / by_tokens[n]:.3f} |")


if __name__ == "__main__":
    main()

