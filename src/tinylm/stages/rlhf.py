"""RLHF in rounds: sample, rank, reward model, PPO (or DPO), evaluate; and again.

    tinylm rlhf --config configs/rlhf-request.toml --rounds 2      # rlhf.run(cfg)
    tinylm rlhf --config configs/rlhf-request.toml --rounds 3 --resume
    tinylm serve --run runs/rlhf-request/latest

Round k (1, 2, ...) of `rounds`, starting from the SFT run `init`:
1. **collect**: the round's prompts (`data.prompts_per_round` of the training prompts, a fresh
   slice each round, wrapping around; round 1 takes `data.prompts_first_round` if set, and
   more than there are prompts repeats them, each time with new answers) get `collect.k`
   answers each from the current policy (round 1: the SFT run; then the policy of the round
   before), sampled by the one engine (feedback.collect.sample_answers) and stored in
   `<out>/feedback.db` as comparisons tagged with the round, the policy that sampled them and
   the reward model of the round before.
2. **rank**: a guideline labeler (`labeler = "request" | "sentiment" | "textblob"`) ranks
   them at once; with `labeler = "web"` the round waits, polling the store and printing a
   progress line, until people on /label (`tinylm serve --run POLICY --db <out>/feedback.db`)
   have stored `web.quota` rankings of this round's comparisons.
3. **reward**: a reward model (stages/reward.py, the `[reward]` table) trained on every
   ranking of rounds 1..k, from the SFT run each round rather than continued from the last
   round's reward model: the reward stage builds its model from an SFT (GPT) run, a fresh fit
   on all rankings weighs every round's rankings alike (a continued one would count the old
   ones twice and drift with the order of the rounds), and its tokenizer is the policy's by
   construction. It costs one reward training per round, sized for that in the presets.
4. **policy**: PPO (stages/ppo.py, `[ppo]`) from the current policy against the new reward
   model, on all training prompts; or, with `method = "dpo"`, DPO (stages/dpo.py, `[dpo]`) from
   the current policy on the rankings of rounds 1..k (`dpo_rankings = "round"`: of round k
   alone, the current policy's own answers). The frozen reference (the stages' `ref` key) is
   the SFT run in every round, so the KL leash does not move with the policy; with
   `reference = "previous"` it is the policy the round starts from, as in iterative DPO
   (Pang et al. 2024's iterative RPO, with `dpo.sft_weight`), a leash that moves each round;
   rounds.json records it.
5. **evaluate** (eval/winrate.py), on held-out prompts the gold judge can score (`gold`, by
   default the labeler; `request` for `web`): win rate of the new policy against the SFT run
   and against the round before (greedy answers, or `eval.samples` sampled at
   `eval.temperature`), mean gold score, mean length, the mean KL to the SFT run (sampled
   answers), and the proxy reward (this round's reward model) beside the gold score, so
   reward hacking shows as a rising proxy over a flat or falling gold.

Everything lands in `<out>/round-<k>/{rankings.jsonl, reward/, policy/}`; after each round
`rounds.json` (every round's runs, counts, metrics and seconds), `rounds.md` (the table) and
`rounds.png` are rewritten atomically, and `<out>/latest` (a symlink, so every run-dir reader
takes it) points at the newest policy. `--resume` continues after the last finished round: an
unfinished round's run dirs are written again, its comparisons already in the store are reused
(not sampled twice), and its rankings too.
"""

from __future__ import annotations

import copy
import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from tinylm import config as configlib
from tinylm import viz  # noqa: F401  (matplotlib's Agg backend, before pyplot)
from tinylm.errors import UserError
from tinylm.eval import winrate as wr
from tinylm.feedback import labelers
from tinylm.feedback.collect import CollectConfig, PromptRow, read_prompts, sample_answers
from tinylm.feedback.io import ranking_line
from tinylm.feedback.store import Answer, Comparison, Prompt, Ranking, Store
from tinylm.files import atomic_write_bytes, atomic_write_text
from tinylm.stages import dpo, ppo, reward

WEB = "web"
PROGRESS_EVERY_S = 10.0  # the web labeler's progress line, when nothing changed meanwhile
METHODS = ("ppo", "dpo")


@dataclass
class RoundsDataConfig:
    prompts: str = "runs/chat/chat-train.jsonl"  # the training prompts (make-chat rows, ...)
    heldout: str = "runs/chat/chat-heldout.jsonl"  # prompts for the evaluation only
    task: str = ""  # keep only rows of this make-chat task ("story"); "" = every row
    prompts_per_round: int = 24  # prompts sampled and ranked per round
    prompts_first_round: int = 0  # round 1's (the SFT run's answers); 0 = prompts_per_round.
    # InstructGPT's first comparison set was its big one; here ten sets of answers a prompt
    # make a reward model that reads the request (docs/rlhf.md, "Ten rankings a request")
    eval_prompts: int = 16  # held-out prompts of the evaluation; 0 = all


@dataclass
class RoundsCollectConfig:
    k: int = 4  # answers per prompt
    max_new_tokens: int = 96
    temperature: float = 1.0
    seed: int = 0  # round k samples with seed + k


@dataclass
class WebConfig:
    quota: int = 20  # rankings by people of a round's comparisons before it goes on
    poll_s: float = 5.0  # seconds between looks at the store
    timeout_s: float = 0.0  # give up (resume later) after this long; 0 = wait


@dataclass
class RoundsEvalConfig:
    max_new_tokens: int = 96
    temperature: float = 0.0  # 0: greedy answers; > 0: `samples` sampled answers per prompt
    samples: int = 1  # per prompt and side (eval winrate --samples)
    kl_samples: int = 2  # sampled answers per prompt for the KL to the reference
    also: list[str] = field(default_factory=list)  # judges reported beside gold ("textblob")


@dataclass
class RLHFConfig:
    out: str = "runs/rlhf-rounds"
    init: str = ""  # the SFT run: round 1's policy and every round's reference (required)
    rounds: int = 1  # rounds in all (--rounds N); with --resume, the total to reach
    method: str = "ppo"  # ppo | dpo
    reference: str = "sft"  # each round's frozen reference: "sft" (init, in every round) or
    # "previous" (the policy the round starts from: iterative DPO's moving reference)
    dpo_rankings: str = "all"  # what DPO learns from: "all" rounds' rankings so far, or
    # "round": this round's alone (answers of the policy it starts from: on-policy)
    labeler: str = "request"  # request | sentiment | textblob | web (people on /label)
    gold: str = ""  # the evaluation's judge; "" = the labeler (request for web)
    db: str = ""  # the feedback store; "" = <out>/feedback.db
    data: RoundsDataConfig = field(default_factory=RoundsDataConfig)
    collect: RoundsCollectConfig = field(default_factory=RoundsCollectConfig)
    web: WebConfig = field(default_factory=WebConfig)
    eval: RoundsEvalConfig = field(default_factory=RoundsEvalConfig)
    # the stages' own configs; out, init, reward and data paths are set by each round
    reward: reward.RewardStageConfig = field(default_factory=reward.RewardStageConfig)
    ppo: ppo.PPOStageConfig = field(default_factory=ppo.PPOStageConfig)
    dpo: dpo.DPOConfig = field(default_factory=dpo.DPOConfig)

    @property
    def gold_judge(self) -> str:
        return self.gold or ("request" if self.labeler == WEB else self.labeler)

    @property
    def store_path(self) -> str:
        return self.db or str(Path(self.out) / "feedback.db")


def check(cfg: RLHFConfig) -> None:
    """The settings a round needs, as one-line UserErrors (before anything runs)."""
    if not cfg.init:
        raise UserError("rlhf needs the SFT run to start from: set init = \"RUN\" in the "
                        "config or pass --init RUN")
    if not (Path(cfg.init) / "model.json").is_file():
        raise UserError(f"init = {cfg.init!r} is not a run dir (no model.json); give the SFT "
                        "run (tinylm sft)")
    if cfg.rounds < 1:
        raise UserError(f"rounds = {cfg.rounds}: run at least 1 round (--rounds N, N >= 1)")
    if cfg.method not in METHODS:
        raise UserError(f"method = {cfg.method!r}: use ppo or dpo")
    if cfg.reference not in ("sft", "previous"):
        raise UserError(f"reference = {cfg.reference!r}: use sft or previous")
    if cfg.dpo_rankings not in ("all", "round"):
        raise UserError(f"dpo_rankings = {cfg.dpo_rankings!r}: use all or round")
    if cfg.labeler != WEB and cfg.labeler not in labelers.LABELERS:
        raise UserError(f"unknown labeler {cfg.labeler!r}; use one of "
                        f"{', '.join([*labelers.LABELERS, WEB])}")
    wr.judge_of(cfg.gold_judge)  # an unknown judge fails here, not after a round's training
    wr.check_sampling(cfg.eval.temperature, cfg.eval.samples)
    for j in cfg.eval.also:
        wr.judge_of(j)
    if cfg.collect.k < 2:
        raise UserError(f"collect.k = {cfg.collect.k}: a ranking needs at least 2 answers")
    if cfg.data.prompts_per_round < 1:
        raise UserError("data.prompts_per_round must be at least 1")
    if cfg.data.prompts_first_round < 0:
        raise UserError("data.prompts_first_round must be 0 (as prompts_per_round) or more")
    if cfg.labeler == WEB and cfg.web.quota < 1:
        raise UserError("web.quota must be at least 1 ranking per round")


# --- prompts -----------------------------------------------------------------------------------
def prompt_rows(path: str, task: str, judge: str) -> list[PromptRow]:
    """The rows of `path` of `task` (if set) that `judge` can score."""
    _, _, can_judge = wr.judge_of(judge)
    rows = read_prompts(path, keep=lambda r: (not task or r.meta.get("task") == task)
                        and can_judge(r.row))
    return rows


def round_prompts(rows: list[PromptRow], k: int, n: int, first: int = 0) -> list[PromptRow]:
    """Round k's slice of `rows`, wrapping around: n prompts after those of rounds 1..k-1
    (round 1 takes `first` if set). A slice longer than `rows` holds a prompt more than once,
    each time with its own answers."""
    first = first or n
    size, start = (first, 0) if k == 1 else (n, first + (k - 2) * n)
    return [rows[(start + i) % len(rows)] for i in range(size)]


# --- (a) collect, (b) rank -----------------------------------------------------------------------
def round_comparisons(store: Store, k: int) -> list[dict]:
    """The comparisons sampled in round k: id, prompt row, answer ids and texts."""
    out = []
    with store.session() as s:
        q = (select(Comparison).join(Answer, Answer.comparison_id == Comparison.id)
             .where(Answer.position == 0, Answer.round == k).order_by(Comparison.id))
        for c in s.scalars(q):
            p = s.get(Prompt, c.prompt_id)
            out.append({"id": c.id, "row": {"messages": p.messages, **p.meta},
                        "answer_ids": [a.id for a in c.answers],
                        "answers": [a.text for a in c.answers]})
    return out


def collect_round(cfg: RLHFConfig, k: int, policy: str, reward_model: str,
                  prompts: list[PromptRow], store: Store) -> dict[str, int]:
    """Sample K answers per prompt from `policy` and store them as round k's comparisons;
    a round whose comparisons are in the store already (a resumed round) is not sampled
    again."""
    import tinylm
    from tinylm import rundir
    from tinylm.infer.engine import Engine

    have = round_comparisons(store, k)
    if have:
        print(f"round {k}: {len(have)} comparisons of this round are in the store already")
        return {"prompts": len(prompts), "comparisons": len(have), "skipped": 0}
    ccfg = CollectConfig(k=cfg.collect.k, max_new_tokens=cfg.collect.max_new_tokens,
                         temperature=cfg.collect.temperature, seed=cfg.collect.seed + k,
                         round=k, reward_model=reward_model)
    model, tok = tinylm.load(policy, family="gpt")
    template = rundir.chat_template(Path(policy), required=True)
    engine = Engine(model, tok, dtype=ccfg.dtype, max_batch=ccfg.max_batch)
    texts = sample_answers(engine, template, prompts, ccfg)
    sampling = {"k": ccfg.k, "max_new_tokens": ccfg.max_new_tokens,
                "temperature": ccfg.temperature, "seed": ccfg.seed}
    stored = 0
    for p, answers in zip(prompts, texts):
        if len(answers) >= 2:
            pid = store.add_prompt(p.messages, p.meta)
            store.add_answers(pid, answers, policy=policy, sampling=sampling, round=k,
                              reward_model=reward_model)
            stored += 1
    return {"prompts": len(prompts), "comparisons": stored, "skipped": len(prompts) - stored}


def rank_round(labeler: str, k: int, store: Store) -> int:
    """A guideline labeler ranks every comparison of round k (idempotently: the key is the
    labeler and the comparison, as `feedback collect` makes it); returns how many."""
    lab = labelers.get(labeler)
    comps = round_comparisons(store, k)
    for c in comps:
        order = lab.rank(c["answers"], c["row"])
        store.add_ranking(c["id"], [[c["answer_ids"][i] for i in tier] for tier in order],
                          labeler=lab.name, key=f"{lab.name}:{c['id']}")
    return len(comps)


def people_rankings(store: Store, k: int) -> tuple[int, int]:
    """(ordered rankings of round k by people, distinct people): guideline labelers and
    "all bad" flags without an order do not count."""
    with store.session() as s:
        rs = list(s.scalars(select(Ranking).where(Ranking.round == k,
                                                  Ranking.labeler.notin_(list(labelers.LABELERS)))))
    done = [r for r in rs if r.order]
    return len(done), len({r.labeler for r in done})


def wait_for_people(cfg: RLHFConfig, k: int, policy: str, store: Store) -> int:
    """Poll the store until people have stored web.quota rankings of round k (a progress line
    on the way); returns the count. A timeout is a UserError: rank more, then --resume."""
    quota, start = cfg.web.quota, time.monotonic()
    n, people = people_rankings(store, k)
    if n < quota:
        print(f"round {k}: waiting for {quota} rankings on /label; serve them with\n"
              f"  tinylm serve --run {policy} --db {cfg.store_path}\n"
              f"  and open http://127.0.0.1:8000/label?labeler=NAME", flush=True)
    shown, shown_at = None, 0.0
    while n < quota:
        waited = time.monotonic() - start
        if (n, people) != shown or waited - shown_at >= PROGRESS_EVERY_S:  # not every poll
            print(f"\rround {k}: {n}/{quota} rankings from {people} people, "
                  f"{waited:.0f} s", end="", flush=True)
            shown, shown_at = (n, people), waited
        if cfg.web.timeout_s and waited >= cfg.web.timeout_s:
            print()
            raise UserError(f"round {k}: {n} of {quota} rankings after {waited:.0f} s; rank "
                            "more on /label and continue with --resume")
        time.sleep(cfg.web.poll_s)
        n, people = people_rankings(store, k)
    print(f"\rround {k}: {n}/{quota} rankings from {people} people: quota met", flush=True)
    return n


def write_rankings(store: Store, k: int, path: Path, first: int = 1) -> dict[int, int]:
    """Every ranked comparison of rounds first..k (labelers merged) as rankings JSONL;
    returns the count per round."""
    lines = [ranking_line(rc) for rc in store.ranked_comparisons() if first <= rc.round <= k]
    atomic_write_text(path, "".join(json.dumps(x) + "\n" for x in lines))
    counts: dict[int, int] = {}
    for x in lines:
        counts[x["round"]] = counts.get(x["round"], 0) + 1
    return counts


# --- (c) reward, (d) policy ----------------------------------------------------------------------
def train_reward(cfg: RLHFConfig, rdir: Path, rankings: Path) -> tuple[str, dict]:
    rcfg = copy.deepcopy(cfg.reward)
    rcfg.out, rcfg.init, rcfg.data.path = str(rdir / "reward"), cfg.init, str(rankings)
    return rcfg.out, reward.run(rcfg)


def train_policy(cfg: RLHFConfig, rdir: Path, policy: str, rm: str, rankings: Path,
                 prompts_file: Path) -> tuple[str, str, dict]:
    """PPO or DPO from `policy`; returns (policy run, reference used, last metrics)."""
    if cfg.method == "ppo":
        pcfg = copy.deepcopy(cfg.ppo)
        pcfg.reward, pcfg.data.prompts = rm, str(prompts_file)
        if cfg.gold_judge in labelers.LABELERS:
            pcfg.data.gold = cfg.gold_judge
        stage = ppo
    else:
        pcfg = copy.deepcopy(cfg.dpo)
        pcfg.data.path = str(rankings)
        stage = dpo
    pcfg.out, pcfg.init = str(rdir / "policy"), policy
    pcfg.ref = cfg.init if cfg.reference == "sft" else policy
    return pcfg.out, pcfg.ref, stage.run(pcfg)


# --- (e) evaluate ------------------------------------------------------------------------------
def evaluate(cfg: RLHFConfig, new: str, prev: str, rm: str, held: list[PromptRow]) -> dict:
    """The new policy against the SFT run (with the KL to it and the proxy reward) and
    against the round before."""
    judges = [f"reward:{rm}", *cfg.eval.also]
    e = cfg.eval
    sampling = {"max_new_tokens": e.max_new_tokens, "temperature": e.temperature,
                "samples": e.samples}
    vs_sft = wr.winrate(new, cfg.init, cfg.gold_judge, held, ref=cfg.init,
                        kl_samples=e.kl_samples, also=judges, **sampling)
    out = {"vs_sft": vs_sft}
    if prev != cfg.init:
        out["vs_previous"] = wr.winrate(new, prev, cfg.gold_judge, held, kl_samples=0,
                                        **sampling)
    proxy = vs_sft["also"][f"reward:{rm}"]
    out["summary"] = {
        "win_rate_vs_sft": vs_sft["win_rate"],
        "win_rate_vs_previous": out.get("vs_previous", vs_sft)["win_rate"],
        "gold": vs_sft["score_a"], "gold_sft": vs_sft["score_b"],
        "proxy": proxy["score_a"], "proxy_sft": proxy["score_b"],
        "kl": vs_sft["kl"], "length": vs_sft["length_a"], "length_sft": vs_sft["length_b"],
        **{f"{j}": vs_sft["also"][j]["score_a"] for j in cfg.eval.also},
    }
    return out


# --- one round, all rounds ---------------------------------------------------------------------
def one_round(cfg: RLHFConfig, k: int, policy: str, prev_rm: str, train_rows: list[PromptRow],
              held: list[PromptRow], prompts_file: Path, store: Store) -> dict:
    out = Path(cfg.out)
    rdir = out / f"round-{k}"
    if rdir.exists():  # an unfinished round (the finished ones are in rounds.json)
        print(f"round {k}: writing the unfinished {rdir} again")
        shutil.rmtree(rdir)
    rdir.mkdir(parents=True)
    secs: dict[str, float] = {}
    cpu: dict[str, float] = {}  # CPU seconds of this process, all threads: on a busy
    # machine the wall seconds measure the neighbours too; alone on 2 cores a round's wall
    # time lies between half its CPU seconds (2 threads busy) and all of them (1 thread)
    t0, c0 = time.monotonic(), time.process_time()
    t, c = t0, c0

    def lap(name: str) -> None:
        nonlocal t, c
        secs[name] = round(time.monotonic() - t, 1)
        cpu[name] = round(time.process_time() - c, 1)
        t, c = time.monotonic(), time.process_time()

    print(f"== round {k}/{cfg.rounds}: policy {policy}")
    counts = collect_round(cfg, k, policy, prev_rm, round_prompts(
        train_rows, k, cfg.data.prompts_per_round, cfg.data.prompts_first_round), store)
    lap("collect")
    if cfg.labeler == WEB:
        counts["rankings"] = wait_for_people(cfg, k, policy, store)
    else:
        counts["rankings"] = rank_round(cfg.labeler, k, store)
    lap("rank")
    rankings = rdir / "rankings.jsonl"
    by_round = write_rankings(store, k, rankings)
    print(f"round {k}: the reward model learns from {sum(by_round.values())} ranked "
          f"comparisons of rounds {sorted(by_round)}")
    rm, rm_metrics = train_reward(cfg, rdir, rankings)
    lap("reward")
    dpo_file = rankings
    if cfg.method == "dpo" and cfg.dpo_rankings == "round":
        dpo_file = rdir / "rankings-round.jsonl"  # this round's answers alone: on-policy
        write_rankings(store, k, dpo_file, first=k)
    new, ref, pol_metrics = train_policy(cfg, rdir, policy, rm, dpo_file, prompts_file)
    lap("policy")
    ev = evaluate(cfg, new, policy, rm, held)
    lap("eval")
    secs["total"] = round(time.monotonic() - t0, 1)
    cpu["total"] = round(time.process_time() - c0, 1)
    return {"round": k, "policy_start": policy, "reward": rm, "policy": new, "method": cfg.method,
            "reference": ref, "labeler": cfg.labeler, "gold": cfg.gold_judge,
            "collect": counts, "reward_rankings_by_round": {str(r): n for r, n in
                                                            sorted(by_round.items())},
            "reward_metrics": _numbers(rm_metrics), "policy_metrics": _numbers(pol_metrics),
            "eval": ev, "seconds": secs, "cpu_seconds": cpu}


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _start(cfg: RLHFConfig, resume: bool) -> list[dict]:
    """The finished rounds (resume) or [] (a fresh start, refused over finished rounds)."""
    out = Path(cfg.out)
    path = out / "rounds.json"
    if path.is_file() and not resume:
        raise UserError(f"{out} holds finished rounds (rounds.json); pass --resume to go on, "
                        "or --out to start elsewhere")
    if resume and not path.is_file():
        if not (out / "config.toml").is_file():
            raise UserError(f"cannot resume: {out} holds no rounds; drop --resume")
        return []
    if not resume:
        out.mkdir(parents=True, exist_ok=True)
        configlib.save(cfg, out / "config.toml")
        return []
    return json.loads(path.read_text())["rounds"]


def run(cfg: RLHFConfig, resume: bool = False) -> dict[str, Any]:
    """Run rounds until cfg.rounds are finished; returns the last round's summary numbers."""
    check(cfg)
    done = _start(cfg, resume)
    if len(done) >= cfg.rounds:
        print(f"rlhf: {len(done)} rounds are finished already in {cfg.out}; ask for more "
              "with --rounds N")
        return done[-1]["eval"]["summary"] if done else {}
    out = Path(cfg.out)
    judge = cfg.labeler if cfg.labeler != WEB else cfg.gold_judge
    train_rows = prompt_rows(cfg.data.prompts, cfg.data.task, judge)
    held = prompt_rows(cfg.data.heldout, cfg.data.task, cfg.gold_judge)
    held = held[: cfg.data.eval_prompts or None]
    prompts_file = out / "prompts-train.jsonl"  # what PPO draws from: the filtered rows
    atomic_write_text(prompts_file, "".join(json.dumps(r.row) + "\n" for r in train_rows))
    store = Store(cfg.store_path)
    first = cfg.data.prompts_first_round
    per_round = f"{first} in round 1, then " if first else ""
    print(f"rlhf: {len(train_rows)} training prompts ({per_round}{cfg.data.prompts_per_round} "
          f"a round), {len(held)} held-out; labeler {cfg.labeler}, judge {cfg.gold_judge}, "
          f"{cfg.method}; rounds {len(done) + 1}..{cfg.rounds} into {out}")
    for k in range(len(done) + 1, cfg.rounds + 1):
        policy = done[-1]["policy"] if done else cfg.init
        prev_rm = done[-1]["reward"] if done else ""
        done.append(one_round(cfg, k, policy, prev_rm, train_rows, held, prompts_file, store))
        publish(cfg, done)
        s = done[-1]["eval"]["summary"]
        print(f"round {k}: win rate vs SFT {s['win_rate_vs_sft']:.2f}, gold {s['gold']:.3f} "
              f"(SFT {s['gold_sft']:.3f}), proxy {s['proxy']:.3f}, KL {s['kl']:.3f}, "
              f"{done[-1]['seconds']['total']:.0f} s; policy {done[-1]['policy']}")
    print(f"rlhf: latest policy {out / 'latest'} -> {done[-1]['policy']}; serve it with "
          f"`tinylm serve --run {out / 'latest'}`")
    return done[-1]["eval"]["summary"]


# --- records -----------------------------------------------------------------------------------
def publish(cfg: RLHFConfig, rounds: list[dict]) -> None:
    """rounds.json, rounds.md, rounds.png and the `latest` symlink, after every round."""
    out = Path(cfg.out)
    atomic_write_text(out / "rounds.json", json.dumps(
        {"init": cfg.init, "method": cfg.method, "labeler": cfg.labeler,
         "gold": cfg.gold_judge, "rounds": rounds}, indent=1) + "\n")
    atomic_write_text(out / "rounds.md", table(rounds))
    plot(rounds, out / "rounds.png")
    point_latest(out, Path(rounds[-1]["policy"]))


def point_latest(out: Path, policy: Path) -> None:
    """<out>/latest -> the policy, relative, swapped in atomically (os.replace of a fresh
    link), so a reader never finds it missing."""
    link, tmp = out / "latest", out / ".latest.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(policy, out), tmp)
    os.replace(tmp, link)


COLUMNS = [  # (header, summary key, format)
    ("win vs SFT", "win_rate_vs_sft", ".2f"), ("win vs prev", "win_rate_vs_previous", ".2f"),
    ("gold", "gold", ".3f"), ("gold SFT", "gold_sft", ".3f"), ("proxy", "proxy", ".3f"),
    ("KL", "kl", ".2f"), ("length", "length", ".1f"),
]


def table(rounds: list[dict]) -> str:
    """The per-round numbers as a Markdown table."""
    def fmt(v: Any, f: str) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, f)

    head = ["round", "rankings", "RM acc", *(h for h, _, _ in COLUMNS), "seconds", "CPU s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rounds:
        s = r["eval"]["summary"]
        cells = [str(r["round"]), str(sum(r["reward_rankings_by_round"].values())),
                 fmt(r["reward_metrics"].get("val_accuracy"), ".3f"),
                 *(fmt(s.get(key), f) for _, key, f in COLUMNS), fmt(r["seconds"]["total"], ".0f"),
                 fmt(r.get("cpu_seconds", {}).get("total"), ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rounds: list[dict], path: Path) -> None:
    """rounds.png: win rates, gold beside proxy, KL, per round."""
    import matplotlib.pyplot as plt  # after tinylm.viz chose the Agg backend

    ks = [r["round"] for r in rounds]
    s = [r["eval"]["summary"] for r in rounds]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3))
    panels = [("win rate", ["win_rate_vs_sft", "win_rate_vs_previous"]),
              ("gold (judge) and proxy (reward model)",
               ["gold", "gold_sft", "proxy", "proxy_sft"]),
              ("KL to the SFT run (nats/answer)", ["kl"])]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            ax.plot(ks, [x[key] for x in s], "o-", ms=4, label=key)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
