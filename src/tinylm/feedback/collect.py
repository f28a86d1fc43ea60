"""`tinylm feedback collect`: sample K answers per prompt from a chat run, rank them with a
guideline labeler, store everything.

    collect("runs/sft-tinystories", "runs/chat/chat-train.jsonl", k=4, labeler="request")

Prompts are rendered through the one chat renderer (data/chat.py) with the run's own
template, and sampled by the one engine (`Engine.generate`): all prompts x K in one call, each
answer with its own seed, so a collection is reproducible and rows do not depend on their
batch mates. An answer stops at the template's end-of-turn token. Answers of a prompt that
come out identical are sampled again with fresh seeds (a few tries); a prompt left with fewer
than 2 distinct answers is skipped and counted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from tinylm import rundir
from tinylm.data import chat
from tinylm.errors import UserError
from tinylm.feedback import labelers
from tinylm.feedback.store import DEFAULT_DB, Store
from tinylm.infer.chat import turn_end_ids
from tinylm.infer.engine import Engine, SamplingParams

RESAMPLE_TRIES = 3


@dataclass
class PromptRow:
    messages: list[dict]  # the turns before the answer
    meta: dict  # the row's other fields (make-chat: task, name, object)

    @property
    def row(self) -> dict:
        return {"messages": self.messages, **self.meta}


def read_prompts(path: str | Path, keep: Callable[[PromptRow], bool] | None = None,
                 limit: int = 0) -> list[PromptRow]:
    """Prompts from JSONL: `{"messages": [...]}` (turns up to the first assistant turn are
    the prompt, so make-chat's conversations work as they are) or `{"prompt": "text"}`. Other
    fields are kept as metadata. `keep(row)` picks the rows to use; duplicates are dropped;
    `limit` > 0 keeps the first that many."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such prompts file; make the shipped one with "
                        "`tinylm data make-chat` (runs/chat/chat-train.jsonl)")
    rows, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        row = _prompt_row(data, where)
        key = json.dumps(row.messages, sort_keys=True)
        if (keep is None or keep(row)) and key not in seen:
            seen.add(key)
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no prompts" + (" this labeler can judge" if keep else "")
                        + '; give JSONL lines with "messages" or "prompt"')
    return rows[:limit] if limit > 0 else rows


def _prompt_row(data, where: str) -> PromptRow:
    if not isinstance(data, dict) or not ("messages" in data or "prompt" in data):
        raise UserError(f'{where}: expected an object with "messages" or "prompt"')
    if "messages" in data:
        messages = chat.check_messages(data["messages"], where)
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                     len(messages))
        messages = messages[:first]
    else:
        if not isinstance(data["prompt"], str):
            raise UserError(f'{where}: "prompt" must be a string')
        messages = [{"role": "user", "content": data["prompt"]}]
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise UserError(f"{where}: the prompt has no user message with text")
    meta = {k: v for k, v in data.items() if k not in ("messages", "prompt")}
    return PromptRow(messages, meta)


@dataclass
class CollectConfig:
    k: int = 4  # answers per prompt
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    round: int = 0
    reward_model: str = ""  # the reward model of this round, if any ("" = none yet)
    dtype: str | None = "auto"  # weights for generation (infer/fast.py); None = exact
    max_batch: int = 256  # rows decoded together. Wider batches use the CPU better: the
    # 5.2M-parameter chat run sampled 1024 answers in 164 s of CPU time at 256 rows, 512 in
    # 131 s at the engine's default 64 (2 shared cores, under load)


def sample_answers(engine: Engine, template: str, prompts: list[PromptRow], cfg: CollectConfig
                   ) -> list[list[str]]:
    """K distinct answers per prompt where sampling gives them (fewer where it does not)."""
    tok = engine.tok
    ids = [chat.render(tok, p.messages, template, add_generation_prompt=True).ids
           for p in prompts]
    stops = turn_end_ids(tok, template)
    too_long = [i for i, x in enumerate(ids) if len(x) >= engine.block_size - 8]
    if too_long:
        raise UserError(f"prompt {too_long[0] + 1} is {len(ids[too_long[0]])} tokens with the "
                        f"template, too long for the model's {engine.block_size}-token window")

    def params(i: int, j: int, attempt: int) -> SamplingParams:
        n = min(cfg.max_new_tokens, engine.block_size - len(ids[i]))
        seed = cfg.seed * 1_000_003 + (attempt * len(prompts) + i) * cfg.k + j
        return SamplingParams(max_new_tokens=n, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, seed=seed, stop_token_ids=stops)

    answers: list[list[str]] = [[] for _ in prompts]
    for attempt in range(RESAMPLE_TRIES):
        want = [(i, j) for i in range(len(prompts)) for j in range(cfg.k - len(answers[i]))]
        if not want:
            break
        done = engine.generate([ids[i] for i, _ in want],
                               [params(i, j, attempt) for i, j in want])
        for (i, _), c in zip(want, done):
            text = c.text.strip()
            if text and text not in answers[i]:
                answers[i].append(text)
    return answers


def collect(run: str | Path, prompts: str | Path | list[PromptRow], k: int = 4,
            labeler: str = "request", db: str | Path = DEFAULT_DB, limit: int = 0,
            cfg: CollectConfig | None = None) -> dict:
    """Sample, label and store; returns counts {prompts, comparisons, rankings, skipped}.

    run: a chat run (its chat template and tokenizer are used). prompts: a JSONL path or
    PromptRows. labeler: a guideline labeler (feedback/labelers.py). db: the store's SQLite
    path or SQLAlchemy URL. limit: use the first N prompts (0 = all)."""
    import tinylm

    cfg = cfg or CollectConfig()
    cfg.k = k
    if k < 2:
        raise UserError(f"--k {k}: a ranking needs at least 2 answers per prompt")
    lab = labelers.get(labeler)
    rows = prompts if isinstance(prompts, list) else read_prompts(
        prompts, keep=lambda r: lab.can_judge(r.row), limit=limit)
    template = rundir.chat_template(Path(run), required=True)
    model, tok = tinylm.load(run, family="gpt")
    store = Store(db, create_folder=True)
    engine = Engine(model, tok, dtype=cfg.dtype, max_batch=cfg.max_batch)
    answers = sample_answers(engine, template, rows, cfg)
    sampling = {k_: v for k_, v in asdict(cfg).items()
                if k_ in ("k", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                          "dtype")}
    counts = {"prompts": len(rows), "comparisons": 0, "rankings": 0, "skipped": 0}
    for p, texts in zip(rows, answers):
        if len(texts) < 2:
            counts["skipped"] += 1
            continue
        order = lab.rank(texts, p.row)
        pid = store.add_prompt(p.messages, p.meta)
        cid, ids = store.add_answers(pid, texts, policy=str(run), sampling=sampling,
                                     round=cfg.round, reward_model=cfg.reward_model)
        store.add_ranking(cid, [[ids[i] for i in tier] for tier in order], labeler=lab.name,
                          key=f"{lab.name}:{cid}")
        counts["comparisons"] += 1
        counts["rankings"] += 1
    store.engine.dispose()
    return counts


def relabel(db: str | Path, labeler: str, source: str | None = None) -> dict:
    """Rank the answers already in the store again with another guideline labeler: every
    comparison ranked by `source` (any labeler when None) gets a ranking by `labeler`, under
    an idempotency key per (labeler, comparison), so a second call stores nothing new.

    The answers `collect` would sample are a function of (run, prompts, seed), so ranking
    the stored ones is what `collect --labeler NAME` with the same seed would store, without
    sampling them again (sampling is most of a collection's time on a CPU). Export one
    labeler's rankings with `tinylm feedback export --only NAME`."""
    lab = labelers.get(labeler)
    store = Store(db)
    counts = {"comparisons": 0, "rankings": 0, "skipped": 0}
    for rc in store.ranked_comparisons(source):
        row = {"messages": rc.messages, **rc.meta}
        counts["comparisons"] += 1
        if not lab.can_judge(row):
            counts["skipped"] += 1
            continue
        order = lab.rank(rc.answers, row)
        store.add_ranking(rc.comparison_id, [[rc.answer_ids[i] for i in t] for t in order],
                          labeler=lab.name, key=f"{lab.name}:{rc.comparison_id}")
        counts["rankings"] += 1
    store.engine.dispose()
    return counts
