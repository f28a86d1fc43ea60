"""RLHF targets (issue 12), end to end on the shipped data: collect -> reward -> PPO / DPO ->
win rate against the SFT start, every stage timed, then the targets table.

1. `request`: `feedback collect` (the SFT run answers K = 4 per training story request, the
   `request` labeler ranks them) -> `feedback export` -> `tinylm reward` (preset
   reward-tinystories) -> `tinylm ppo` (ppo-tinystories) and `tinylm dpo` (dpo-tinystories)
   -> `eval winrate --judge request` of each against the SFT run on the held-out requests.
2. `sentiment`: the same answers ranked again by the `sentiment` labeler (VADER; what
   `collect --labeler sentiment` with the same seed stores, without sampling them again:
   feedback.collect.relabel) -> reward (reward-sentiment) -> PPO (ppo-sentiment) -> win rate
   by VADER, and TextBlob's verdicts on the same answer pairs (the held-out judge).

One "round" is collect + reward + PPO + evaluation; the table gives its time (target: at
most 10 minutes on the 2-core CPU).

    python benchmarks/rlhf_targets.py [--sft runs/sft-timed2] [--prompts N] [--skip-dpo]
        [--skip-sentiment] [--out runs/quality-bench] [--quick]

The win rates are those of `tinylm eval winrate` (eval/winrate.py: greedy answers, ties count
half); the table also gives the ceiling: the win rate of a policy that wins every prompt the
SFT run does not already answer perfectly and ties the rest, which is what a
`request`-judged target can reach at most.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tinylm import config as configlib
from tinylm.eval import winrate as wr
from tinylm.feedback import collect as fc
from tinylm.feedback import labelers
from tinylm.feedback.io import export
from tinylm.feedback.store import Store
from tinylm.stages import dpo, ppo, reward

HELDOUT = "runs/sft-exp-chat/chat-heldout.jsonl"
TRAIN = "runs/sft-exp-chat/chat-train.jsonl"


class Timer:
    def __init__(self) -> None:
        self.rows: list[tuple[str, float]] = []

    def __call__(self, name: str, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        self.rows.append((name, time.perf_counter() - t0))
        print(f"[{name}: {self.rows[-1][1]:.0f} s]", flush=True)
        return out

    def total(self, *names: str) -> float:
        return sum(t for n, t in self.rows if n in names)


def judged(a: str, b: str, prompts: str, judges: list[str], limit: int = 0) -> dict:
    """Greedy answers of a and b (eval/winrate.py's), scored by every judge: per judge the
    win/tie/loss of `eval winrate`, and the per-prompt scores for agreement checks."""
    rows = fc.read_prompts(prompts, keep=lambda r: labelers.get(judges[0]).can_judge(r.row),
                           limit=limit)
    got = {side: wr.answers(run, rows) for side, run in (("a", a), ("b", b))}
    out = {}
    for j in judges:
        lab = labelers.get(j)
        sa = [lab.score(x, r.row) for x, r in zip(got["a"], rows)]
        sb = [lab.score(x, r.row) for x, r in zip(got["b"], rows)]
        out[j] = wr.compare(sa, sb, lab.resolution) | {"scores_a": sa, "scores_b": sb,
                                                       "resolution": lab.resolution}
    return out


def ceiling(sft_scores: list[float], top: float) -> float:
    """The best win rate any policy can have against answers scoring `sft_scores` when a
    perfect answer scores `top` and ties count half."""
    imperfect = sum(s < top for s in sft_scores)
    return (imperfect + 0.5 * (len(sft_scores) - imperfect)) / len(sft_scores)


def agreement(j1: dict, j2: dict) -> dict:
    """TextBlob's verdicts beside VADER's on the same answer pairs: the share of the pairs
    TextBlob does not tie where it prefers A, and the share of the pairs neither ties where
    the two judges pick the same side."""
    def sign(a, b, res):
        ka, kb = round(a / res), round(b / res)
        return (ka > kb) - (ka < kb)

    s1 = [sign(a, b, j1["resolution"]) for a, b in zip(j1["scores_a"], j1["scores_b"])]
    s2 = [sign(a, b, j2["resolution"]) for a, b in zip(j2["scores_a"], j2["scores_b"])]
    untied = [y for y in s2 if y]
    both = [(x, y) for x, y in zip(s1, s2) if x and y]
    return {"prefers_a": sum(y > 0 for y in untied) / max(len(untied), 1),
            "untied": len(untied),
            "same_side": sum(x == y for x, y in both) / max(len(both), 1), "both": len(both)}


def load(cls, preset: str, overrides: list[str]):
    return configlib.load(cls, preset, ["train.progress=false", *overrides])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sft", default="runs/sft-timed2")
    ap.add_argument("--out", default="runs/quality-bench")
    ap.add_argument("--prompts", type=int, default=0,
                    help="training story requests to collect on (0 = all)")
    ap.add_argument("--db", default="", help="reuse this store instead of collecting")
    ap.add_argument("--skip-dpo", action="store_true")
    ap.add_argument("--skip-sentiment", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a smoke run: tiny everything")
    args = ap.parse_args()
    out, sft, t = Path(args.out), args.sft, Timer()
    out.mkdir(parents=True, exist_ok=True)
    small = ["train.steps=2", "train.eval_every=0"] if args.quick else []
    small_ppo = small + ["data.eval_prompts=4", "ppo.prompts_per_step=2",
                         "ppo.max_new_tokens=32"] if args.quick else []
    limit = 16 if args.quick else args.prompts
    db = args.db or str(out / "feedback.db")
    if not args.db:
        t("collect", fc.collect, sft, TRAIN, k=4, labeler="request", db=db, limit=limit,
          cfg=fc.CollectConfig(seed=1))
    store = Store(db)
    t("export", export, store, out / "request.jsonl", "rankings", "request")
    rm = t("reward", reward.run, load(reward.RewardStageConfig, "reward-tinystories", [
        f"init='{sft}'", f"data.path='{out / 'request.jsonl'}'", f"out='{out / 'reward'}'",
        *small]))
    pp = t("ppo", ppo.run, load(ppo.PPOStageConfig, "ppo-tinystories", [
        f"init='{sft}'", f"reward='{out / 'reward'}'", f"out='{out / 'ppo'}'",
        f"data.prompts='{TRAIN}'", *small_ppo]))
    w_ppo = t("eval", judged, str(out / "ppo"), sft, HELDOUT, ["request"], 8 if args.quick else 0)
    table = [("reward held-out pairwise accuracy (request)", rm.get("val_accuracy", float("nan")),
              ">= 0.80", rm.get("val_accuracy", 0) >= 0.80)]
    req = w_ppo["request"]
    top = ceiling(req["scores_b"], 5.0)
    table.append((f"PPO vs SFT win rate (request), ceiling {top:.3f}", req["win_rate"],
                  ">= 0.70", req["win_rate"] >= 0.70))
    table.append(("PPO mean KL to the reference (eval/kl, nats per answer)",
                  pp.get("eval/kl", float("nan")), "reported", True))
    if not args.skip_dpo:
        t("dpo", dpo.run, load(dpo.DPOConfig, "dpo-tinystories", [
            f"init='{sft}'", f"data.path='{out / 'request.jsonl'}'", f"out='{out / 'dpo'}'",
            *small]))
        w_dpo = t("eval-dpo", judged, str(out / "dpo"), sft, HELDOUT, ["request"],
                  8 if args.quick else 0)["request"]
        table.append(("DPO vs SFT win rate (request)", w_dpo["win_rate"], ">= 0.65",
                      w_dpo["win_rate"] >= 0.65))
    if not args.skip_sentiment:
        t("relabel", fc.relabel, db, "sentiment", "request")
        t("export-s", export, store, out / "sentiment.jsonl", "rankings", "sentiment")
        rs = t("reward-s", reward.run, load(reward.RewardStageConfig, "reward-sentiment", [
            f"init='{sft}'", f"data.path='{out / 'sentiment.jsonl'}'",
            f"out='{out / 'reward-s'}'", *small]))
        t("ppo-s", ppo.run, load(ppo.PPOStageConfig, "ppo-sentiment", [
            f"init='{sft}'", f"reward='{out / 'reward-s'}'", f"out='{out / 'ppo-s'}'",
            f"data.prompts='{TRAIN}'", *small_ppo]))
        js = t("eval-s", judged, str(out / "ppo-s"), sft, HELDOUT, ["sentiment", "textblob"],
               8 if args.quick else 0)
        ag = agreement(js["sentiment"], js["textblob"])
        table += [
            ("sentiment reward held-out pairwise accuracy", rs.get("val_accuracy", float("nan")),
             "reported", True),
            ("sentiment PPO vs SFT win rate (VADER)", js["sentiment"]["win_rate"], ">= 0.70",
             js["sentiment"]["win_rate"] >= 0.70),
            (f"TextBlob prefers PPO, of the {ag['untied']} pairs it does not tie",
             ag["prefers_a"], ">= 0.60", ag["prefers_a"] >= 0.60),
            (f"TextBlob and VADER pick the same side, of {ag['both']} pairs neither ties",
             ag["same_side"], "reported", True)]
    store.engine.dispose()
    one_round = t.total("collect", "export", "reward", "ppo", "eval")
    table.append(("one round: collect + reward + PPO + evaluation (s)", one_round, "<= 600",
                  one_round <= 600))
    print("\n| stage | seconds |\n|---|---|")
    for name, sec in t.rows:
        print(f"| {name} | {sec:.0f} |")
    print("\n| target | value | target | met |\n|---|---|---|---|")
    for name, value, target, met in table:
        print(f"| {name} | {value:.3f} | {target} | {'yes' if met else 'no'} |")
    (out / "targets.json").write_text(json.dumps({"stages": t.rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
