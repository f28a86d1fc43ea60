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
        [--ppo RUN] [--dpo RUN] [--samples 4] [--temperature 1]

`--ppo RUN` / `--dpo RUN` judge policies already trained (e.g. from configs/ppo-request.toml
and configs/dpo-request.toml) instead of training them here; with both, nothing is collected.

The win rates are those of `tinylm eval winrate` (eval/winrate.py, ties count half), each
request win rate twice: greedy (what `tinylm chat --temperature 0` shows) and sampled
(`--samples` answers per prompt per side at `--temperature`, sample j of the policy against
sample j of the SFT run: the distribution PPO optimises), with its standard error over
prompts. Beside each stands its ceiling: the win rate of a policy that wins every pair the
SFT answer does not already score perfectly and ties the rest. Greedy SFT answers score the
top mark on most held-out requests, so the greedy ceiling is below the issue's targets
(docs/rlhf.md); the sampled SFT answers leave room. The KL is `eval winrate`'s: the policy's
own samples, on the held-out prompts, against the SFT run.
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


def judged(a: str, b: str, prompts: str, judges: list[str], limit: int = 0,
           temperature: float = 0.0, samples: int = 1) -> dict:
    """Answers of a and b (eval/winrate.py's: greedy, or `samples` per prompt per side at
    `temperature`), scored by every judge: per judge the win/tie/loss of `eval winrate`, its
    standard error over prompts, and the per-answer scores for ceilings and agreement checks."""
    rows = fc.read_prompts(prompts, keep=lambda r: labelers.get(judges[0]).can_judge(r.row),
                           limit=limit)
    got = wr.both_answers(a, b, rows, temperature=temperature, samples=samples)
    out = {"rows": rows}
    for j in judges:
        sa, sb, resolution = wr.side_scores(got, rows, j, samples)
        out[j] = wr.compare(sa, sb, resolution) | {
            "win_rate_se": wr.win_rate_se(sa, sb, resolution, samples),
            "scores_a": sa, "scores_b": sb, "resolution": resolution}
    return out


def request_rows(t: Timer, name: str, policy: str, sft: str, limit: int, samples: int,
                 temperature: float, target: float) -> list[tuple]:
    """The targets-table rows of one policy by the `request` labeler: greedy and sampled win
    rates against the SFT run, each beside its ceiling, the mean scores, and the KL."""
    rows = []
    for how, temp, n in (("greedy", 0.0, 1), (f"T={temperature:g}, {samples} samples", temperature,
                                              samples)):
        j = t(f"eval-{name.lower()}-{'greedy' if n == 1 else 'sampled'}", judged, policy, sft,
              HELDOUT, ["request"], limit, temp, n)
        req = j["request"]
        top = req["ceiling"]
        pairs = len(req["scores_a"])
        rows.append((f"{name} vs SFT win rate (request, {how}; {req['win']}/{req['tie']}/"
                     f"{req['loss']} of {pairs}, +-{req['win_rate_se']:.3f}; ceiling {top:.3f})",
                     req["win_rate"], f">= {target:.2f}", req["win_rate"] >= target))
        rows.append((f"{name} mean request score ({how})", sum(req["scores_a"]) / pairs,
                     f"SFT {sum(req['scores_b']) / pairs:.3f}", None))
    kl = t(f"kl-{name.lower()}", wr.mean_kl, policy, sft, j["rows"], 2)
    rows.append((f"{name} mean KL to the SFT run (eval winrate, nats per answer)", kl,
                 "reported", None))
    return rows


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
    ap.add_argument("--ppo", default="", help="judge this PPO run instead of training one")
    ap.add_argument("--dpo", default="", help="judge this DPO run instead of training one")
    ap.add_argument("--samples", type=int, default=4,
                    help="sampled win rate: answers per prompt per side (default 4)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampled win rate: temperature (default 1, what PPO optimises)")
    args = ap.parse_args()
    out, sft, t = Path(args.out), args.sft, Timer()
    out.mkdir(parents=True, exist_ok=True)
    small = ["train.steps=2", "train.eval_every=0"] if args.quick else []
    small_ppo = small + ["data.eval_prompts=4", "ppo.prompts_per_step=2",
                         "ppo.max_new_tokens=32"] if args.quick else []
    limit = 16 if args.quick else args.prompts
    evals = 8 if args.quick else 0
    samples = 2 if args.quick else args.samples
    db = args.db or str(out / "feedback.db")
    table = []
    train_request = not args.ppo or not (args.dpo or args.skip_dpo)
    store = None  # the rankings: for training here, and for the sentiment relabelling
    if train_request or not args.skip_sentiment:
        if not args.db:
            t("collect", fc.collect, sft, TRAIN, k=4, labeler="request", db=db, limit=limit,
              cfg=fc.CollectConfig(seed=1))
        store = Store(db)
    if train_request:
        t("export", export, store, out / "request.jsonl", "rankings", "request")
    pp: dict = {}
    if args.ppo:
        ppo_run = args.ppo
    else:
        rm = t("reward", reward.run, load(reward.RewardStageConfig, "reward-tinystories", [
            f"init='{sft}'", f"data.path='{out / 'request.jsonl'}'", f"out='{out / 'reward'}'",
            *small]))
        table.append(("reward held-out pairwise accuracy (request)",
                      rm.get("val_accuracy", float("nan")), ">= 0.80",
                      rm.get("val_accuracy", 0) >= 0.80))
        pp = t("ppo", ppo.run, load(ppo.PPOStageConfig, "ppo-tinystories", [
            f"init='{sft}'", f"reward='{out / 'reward'}'", f"out='{out / 'ppo'}'",
            f"data.prompts='{TRAIN}'", *small_ppo]))
        ppo_run = str(out / "ppo")
    table += request_rows(t, "PPO", ppo_run, sft, evals, samples, args.temperature, 0.70)
    if pp:
        table.append(("PPO eval/kl at the end of training (nats per answer)",
                      pp.get("eval/kl", float("nan")), "reported", None))
    if not args.skip_dpo:
        if args.dpo:
            dpo_run = args.dpo
        else:
            t("dpo", dpo.run, load(dpo.DPOConfig, "dpo-tinystories", [
                f"init='{sft}'", f"data.path='{out / 'request.jsonl'}'", f"out='{out / 'dpo'}'",
                *small]))
            dpo_run = str(out / "dpo")
        table += request_rows(t, "DPO", dpo_run, sft, evals, samples, args.temperature, 0.65)
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
               evals)
        ag = agreement(js["sentiment"], js["textblob"])
        table += [
            ("sentiment reward held-out pairwise accuracy", rs.get("val_accuracy", float("nan")),
             "reported", None),
            ("sentiment PPO vs SFT win rate (VADER)", js["sentiment"]["win_rate"], ">= 0.70",
             js["sentiment"]["win_rate"] >= 0.70),
            (f"TextBlob prefers PPO, of the {ag['untied']} pairs it does not tie",
             ag["prefers_a"], ">= 0.60", ag["prefers_a"] >= 0.60),
            (f"TextBlob and VADER pick the same side, of {ag['both']} pairs neither ties",
             ag["same_side"], "reported", None)]
    if store is not None:
        store.engine.dispose()
    if not args.ppo:
        one_round = t.total("collect", "export", "reward", "ppo", "eval-ppo-greedy")
        table.append(("one round: collect + reward + PPO + greedy evaluation (s)", one_round,
                      "<= 600", one_round <= 600))
    print("\n| stage | seconds |\n|---|---|")
    for name, sec in t.rows:
        print(f"| {name} | {sec:.0f} |")
    print("\n| target | value | target | met |\n|---|---|---|---|")
    for name, value, target, met in table:
        print(f"| {name} | {value:.3f} | {target} | "
              f"{'-' if met is None else 'yes' if met else 'no'} |")
    (out / "targets.json").write_text(json.dumps({"stages": t.rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
