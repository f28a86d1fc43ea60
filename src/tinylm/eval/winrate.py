"""`tinylm eval winrate`: run A against run B on the same prompts, judged answer by answer.

    winrate("runs/dpo", "runs/sft-tinystories", judge="request",
            prompts="runs/chat/chat-heldout.jsonl")

Both runs answer every prompt through their own chat template and the one engine: greedy by
default (temperature 0), or sampled, `samples` answers per prompt per side at `temperature`.
Greedy is what a user of `tinylm chat --temperature 0` sees, but it can hide a change: when B's
greedy answers already score the top mark, ties cap the win rate (docs/rlhf.md), while PPO
optimises the policy's sampled answers (temperature 1), which is what sampling judges. The j-th
sample of A to a prompt is compared with the j-th sample of B and every pair counts once. Each
answer has its own seed and the two sides' seeds never overlap, so A's and B's answers are
independent draws and the win rate estimates the usual P(A's answer beats B's) + P(tie) / 2
of the two distributions. (Shared seeds, common random numbers, would tie most pairs of two
close policies and cut the noise, but the expected outcome of a pair would then depend on how
the engine's random numbers couple the two samplers, not on the distributions alone.) A judge
scores each answer:
a guideline labeler (`request`, `sentiment`, `textblob`: feedback/labelers.py) or a trained
reward model (`reward:RUN`, its raw score at the end-of-answer token). A's answer wins when
its score is higher; scores equal at the labeler's resolution are ties. Reported: win, tie
and loss counts, the win rate (ties count half), mean judge score and mean length in words of
each side, the same for any further judges (`also`: e.g. the reward model beside the gold
labeler, or TextBlob beside VADER), and the mean KL of A to a reference. With several samples
per prompt the pairs of one prompt are not independent, so the standard error of the win rate
(`win_rate_se`) is taken over prompts: the spread of the per-prompt win rates. For a labeler
with a top mark (`request`: 5) `ceiling` is the win rate a policy meeting every guideline
every time would have against B: how much room B leaves (against a strong SFT run, little).

KL to the reference: A samples `kl_samples` answers to every prompt at temperature 1 (the
policy's own distribution: greedy answers are not samples of it), and for each the summed
log pi_A(y) - log pi_ref(y) over the answer's tokens (its end token included) is the k1
estimate of KL(pi_A || pi_ref) for that answer; the mean over answers is reported, in nats
per answer, as train/ppo.py's `eval/kl` is. Both sides are scored by one forward pass over the
exact sampled token ids with `feedback.preferences.sequence_logprobs` (the numerics DPO uses),
so a run against itself is exactly 0, and re-tokenising the text cannot shift it. (train/ppo.py's
`kl_estimate` lives a layer above eval/; k1 is its plain difference.) The reference defaults to
the SFT run a PPO or DPO run was trained from (`reference_of`: `init` followed back through
PPO and DPO runs' config.toml), else B.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import tinylm
from tinylm import config as configlib
from tinylm import rundir
from tinylm.data import chat
from tinylm.errors import UserError
from tinylm.feedback import labelers
from tinylm.feedback.collect import PromptRow, read_prompts
from tinylm.feedback.preferences import render_answer, sequence_logprobs
from tinylm.infer.chat import turn_end_ids
from tinylm.infer.engine import Engine, SamplingParams


def answers(run: str | Path, rows: list[PromptRow], max_new_tokens: int = 96,
            temperature: float = 0.0, seed: int = 0, dtype: str | None = "auto",
            samples: int = 1) -> list[str]:
    """`samples` answers of chat run `run` to every prompt (greedy when temperature is 0),
    prompt-major: row i's j-th answer is at i * samples + j, seeded seed + i * samples + j
    (so the same in any batch, and calls with seeds len(rows) * samples apart never share
    one)."""
    model, tok = tinylm.load(run, family="gpt")
    template = rundir.chat_template(Path(run), required=True)
    engine = Engine(model, tok, dtype=dtype)
    ids = [chat.render(tok, r.messages, template, add_generation_prompt=True).ids for r in rows]
    stops = turn_end_ids(tok, template)
    picks = [(i, j) for i in range(len(ids)) for j in range(samples)]
    params = [SamplingParams(max_new_tokens=min(max_new_tokens, engine.block_size - len(ids[i])),
                             temperature=temperature, seed=seed + i * samples + j,
                             stop_token_ids=stops, truncate=True) for i, j in picks]
    done = engine.generate([ids[i] for i, _ in picks], params)
    return [c.text.strip() for c in done]


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


def win_rate_se(scores_a: list[float], scores_b: list[float], resolution: float,
                samples: int = 1) -> float:
    """Standard error of the win rate over prompts: the pairs of one prompt (its `samples`
    consecutive scores) are one unit, so the spread of the per-prompt win rates, over
    sqrt(prompts), is what a fresh draw of prompts would move it by."""
    per_prompt = [compare(scores_a[i : i + samples], scores_b[i : i + samples],
                          resolution)["win_rate"] for i in range(0, len(scores_a), samples)]
    if len(per_prompt) < 2:
        return float("nan")
    return float(torch.tensor(per_prompt, dtype=torch.float64).std() / len(per_prompt) ** 0.5)


def is_tuned_run(run: Path) -> bool:
    """Whether `run` is a PPO or DPO run (trained against a frozen reference), by the keys of
    its resolved config.toml: PPO's `reward` and `ppo`, DPO's `beta`."""
    path = run / "config.toml"
    if not path.is_file():
        return False
    cfg = configlib.read_toml(path)
    return ("ppo" in cfg and "reward" in cfg) or "beta" in cfg


def reference_of(run: str | Path, fallback: str | Path) -> str:
    """The SFT run a PPO/DPO run `run` was trained from: its `ref` (if the stage records
    one) or `init`, followed back through PPO and DPO runs (a later round starts from the
    round before); `fallback` when `run` is neither."""
    path, hops = Path(run), 0
    while is_tuned_run(path) and hops < 100:
        cfg = configlib.read_toml(path / "config.toml")
        nxt = cfg.get("ref") or cfg.get("init")
        if not nxt:
            break
        path, hops = Path(nxt), hops + 1
    return str(path) if hops else str(fallback)


def _padded(rows: list[list[int]], starts: list[int], pad_id: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) for sequence_logprobs: x = seq[:-1] right-padded, y = seq[1:] with -100 on the
    prompt and the padding, so only answer tokens count."""
    T = max(len(r) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (N, T)
    y = torch.full((len(rows), T), -100, dtype=torch.long)  # (N, T)
    for i, (r, s) in enumerate(zip(rows, starts)):
        x[i, : len(r) - 1] = torch.tensor(r[:-1])
        y[i, s - 1 : len(r) - 1] = torch.tensor(r[s:])
    return x, y


@torch.no_grad()
def mean_kl(run: str | Path, ref: str | Path, rows: list[PromptRow], samples: int = 2,
            max_new_tokens: int = 96, seed: int = 0, batch_size: int = 16,
            dtype: str | None = "auto") -> float:
    """Mean over `samples` sampled answers of `run` per prompt of sum_t log pi_run - log
    pi_ref over the answer's tokens (nats per answer; see the module docstring)."""
    model, tok = tinylm.load(run, family="gpt")
    ref_model, ref_tok = tinylm.load(ref, family="gpt")
    if ref_tok.fingerprint() != tok.fingerprint():
        raise UserError(f"the reference {ref} has another tokenizer than {run}; give --ref the "
                        "SFT run the policy was trained from")
    model.eval()
    ref_model.eval()
    template = rundir.chat_template(Path(run), required=True)
    engine = Engine(model, tok, dtype=dtype)
    ids = [chat.render(tok, r.messages, template, add_generation_prompt=True).ids for r in rows]
    stops = turn_end_ids(tok, template)
    picks = [(i, j) for i in range(len(ids)) for j in range(samples)]
    params = [SamplingParams(max_new_tokens=max(1, min(max_new_tokens,
                                                       engine.block_size - len(ids[i]))),
                             temperature=1.0, seed=seed * 1_000_003 + i * samples + j,
                             stop_token_ids=stops, truncate=True) for i, j in picks]
    done = [c for c in engine.generate([ids[i] for i, _ in picks], params) if c.token_ids]
    kls = []
    for b in range(0, len(done), batch_size):
        part = done[b : b + batch_size]
        seqs = [(list(c.prompt_ids) + list(c.token_ids))[-model.config.block_size - 1:]
                for c in part]
        starts = [len(s) - len(c.token_ids) for s, c in zip(seqs, part)]
        x, y = _padded(seqs, starts, tok.pad_id)
        kls.append(sequence_logprobs(model, x, y) - sequence_logprobs(ref_model, x, y))  # (n,)
    return float(torch.cat(kls).mean()) if kls else float("nan")


def both_answers(a: str | Path, b: str | Path, rows: list[PromptRow], max_new_tokens: int = 96,
                 temperature: float = 0.0, seed: int = 0, samples: int = 1
                 ) -> dict[str, list[str]]:
    """answers() of runs a and b, B's seeds after A's: independent draws (module docstring)."""
    n = len(rows) * samples
    return {side: answers(run, rows, max_new_tokens, temperature, seed + k * n, samples=samples)
            for k, (side, run) in enumerate((("a", a), ("b", b)))}


def side_scores(texts: dict[str, list[str]], rows: list[PromptRow], judge: str,
                samples: int = 1) -> tuple[list[float], list[float], float]:
    """(A's scores, B's scores, the judge's tie resolution); texts hold `samples` answers per
    row, prompt-major (answers())."""
    score, resolution, _ = judge_of(judge)
    a, b = ([score(x, rows[n // samples].row) for n, x in enumerate(texts[side])]
            for side in ("a", "b"))
    return a, b, resolution


def ceiling(scores_b: list[float], top: float, resolution: float) -> float:
    """The win rate of answers that always score `top` (meet every guideline) against answers
    scoring `scores_b`: the most any A can reach against this B, ties counting half. Against
    a strong B it is low: the headroom RL has over its SFT start (docs/rlhf.md)."""
    return compare([top] * len(scores_b), scores_b, resolution)["win_rate"]


def judged(texts: dict[str, list[str]], rows: list[PromptRow], judge: str,
           samples: int = 1) -> dict:
    """Win/tie/loss (pair j of a prompt: A's j-th answer against B's), its standard error over
    prompts, the mean scores of sides a and b by one judge, and for a labeler with a top mark
    the ceiling: the win rate a perfect A would have against B."""
    sa, sb, resolution = side_scores(texts, rows, judge, samples)
    out = {**compare(sa, sb, resolution),
           "win_rate_se": win_rate_se(sa, sb, resolution, samples),
           "score_a": sum(sa) / len(sa), "score_b": sum(sb) / len(sb)}
    top = None if judge.startswith("reward:") else labelers.get(judge).top
    if top is not None:
        out["ceiling"] = ceiling(sb, top, resolution)
    return out


def check_sampling(temperature: float, samples: int) -> None:
    """Refuse sampling settings that cannot mean what they say, before any model loads."""
    if not temperature >= 0:
        raise UserError(f"--temperature {temperature} must be >= 0 (0 = greedy)")
    if samples < 1:
        raise UserError(f"--samples {samples} must be >= 1 (answers per prompt per side)")
    if samples > 1 and temperature == 0:
        raise UserError(f"--samples {samples} needs --temperature > 0: greedy answers are the "
                        "same every time (e.g. --temperature 1 --samples 4)")


def winrate(a: str | Path, b: str | Path, judge: str = "request",
            prompts: str | Path | list[PromptRow] = "runs/chat/chat-heldout.jsonl",
            limit: int = 0, max_new_tokens: int = 96, temperature: float = 0.0, seed: int = 0,
            ref: str | Path | None = None, kl_samples: int = 2,
            also: Sequence[str] = (), samples: int = 1) -> dict:
    """Win/tie/loss of run `a` against run `b` by `judge` on `prompts` (a JSONL path or
    PromptRows), greedy (temperature 0) or `samples` answers per prompt per side at
    `temperature`, with mean scores and lengths, the same by every judge in `also`, and the
    mean KL of `a` to `ref` (default: reference_of(a, b); kl_samples=0 skips it).
    judge: request | sentiment | textblob | reward:RUN."""
    check_sampling(temperature, samples)
    _, _, can_judge = judge_of(judge)
    if isinstance(prompts, list):
        rows = [r for r in prompts if can_judge(r.row)][: limit or None]
        if not rows:
            raise UserError(f"none of the prompts can be judged by {judge!r}")
    else:
        rows = read_prompts(prompts, keep=lambda r: can_judge(r.row), limit=limit)
    got = both_answers(a, b, rows, max_new_tokens, temperature, seed, samples)
    out = {"a": str(a), "b": str(b), "judge": judge, "prompts": len(rows),
           "temperature": temperature, "samples": samples, "pairs": len(got["a"]),
           **judged(got, rows, judge, samples)}
    for side in ("a", "b"):
        out[f"length_{side}"] = sum(len(x.split()) for x in got[side]) / len(got[side])
    if also:
        out["also"] = {j: judged(got, rows, j, samples) for j in also}
    if kl_samples > 0:
        out["ref"] = str(ref) if ref else reference_of(a, b)
        out["kl"] = mean_kl(a, out["ref"], rows, kl_samples, max_new_tokens, seed)
        out["kl_samples"] = kl_samples * len(rows)
    return out
