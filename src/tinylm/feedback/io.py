"""Rankings in and out of the feedback store, as JSONL files.

Two formats:
- **rankings** (K-wise; what `tinylm reward` and `tinylm dpo` read), one comparison a line:
  `{"messages": [prompt turns], "answers": [K texts], "ranks": [K ints], "labelers": [...],
  "policy": RUN, "round": N, ...prompt metadata}`; rank 0 is best, equal ranks are ties. Several
  labelers' rankings of a comparison are exported merged (store.merge_rankings).
- **pairs** (the preference format TRL's RewardTrainer and DPOTrainer read, conversational):
  `{"prompt": [turns], "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}`,
  one line for every ordered pair of a ranking (ties give none).

`read_rankings` reads either (a pairs line is a ranking of K = 2), so the training stages take
a file exported here, by TRL users, or written by hand.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from tinylm.data.chat import check_messages
from tinylm.errors import UserError
from tinylm.feedback.store import RankedComparison, Store, check_answers
from tinylm.files import atomic_write_text

RESERVED = ("messages", "answers", "ranks", "labelers", "policy", "round")


@dataclass
class RankingRow:
    """One prompt's K answers and their ranks (0 = best; equal = tied)."""

    messages: list[dict]
    answers: list[str]
    ranks: list[int]
    meta: dict = field(default_factory=dict)

    def pairs(self) -> list[tuple[int, int]]:
        """(better, worse) index pairs: every strictly ordered pair, ties skipped."""
        return [(i, j) if self.ranks[i] < self.ranks[j] else (j, i)
                for i, j in combinations(range(len(self.answers)), 2)
                if self.ranks[i] != self.ranks[j]]


def ranking_line(rc: RankedComparison) -> dict:
    meta = {k: v for k, v in rc.meta.items() if k not in RESERVED}
    return {"messages": rc.messages, "answers": rc.answers, "ranks": rc.ranks,
            "labelers": rc.labelers, "policy": rc.policy, "round": rc.round, **meta}


def pair_lines(row: RankingRow) -> list[dict]:
    return [{"prompt": row.messages,
             "chosen": [{"role": "assistant", "content": row.answers[i]}],
             "rejected": [{"role": "assistant", "content": row.answers[j]}]}
            for i, j in row.pairs()]


def export(store: Store, path: str | Path, fmt: str = "rankings",
           labeler: str | None = None) -> int:
    """Write the store's ranked comparisons to `path` as `fmt` (rankings | pairs); returns the
    number of lines written."""
    lines = []
    for rc in store.ranked_comparisons(labeler):
        line = ranking_line(rc)
        if fmt == "rankings":
            lines.append(line)
        elif fmt == "pairs":
            lines += pair_lines(row_from_line(line, "store"))
        else:
            raise UserError(f"unknown export format {fmt!r}; use rankings or pairs")
    atomic_write_text(Path(path), "".join(json.dumps(x) + "\n" for x in lines))
    return len(lines)


def import_file(store: Store, path: str | Path, labeler: str = "import", round: int = 0
                ) -> int:
    """Store every ranking (or pair) of a JSONL file as a comparison with one ranking by
    `labeler` (a line's own "labelers" win); returns how many were stored. Importing the same
    file twice stores each ranking once (its idempotency key is its content)."""
    n = 0
    for row in read_rankings(path):
        who = "+".join(row.meta.get("labelers") or [labeler])
        key = "import:" + hashlib.sha256(json.dumps(
            [row.messages, row.answers, row.ranks, who]).encode()).hexdigest()
        if store.ranking_id(key) is not None:
            continue  # imported before
        pid = store.add_prompt(row.messages, {k: v for k, v in row.meta.items()
                                              if k not in ("labelers", "policy", "round")})
        cid, ids = store.add_answers(pid, row.answers, policy=row.meta.get("policy", ""),
                                     round=row.meta.get("round", round))
        by_rank: dict[int, list[int]] = {}
        for a, r in zip(ids, row.ranks):
            by_rank.setdefault(r, []).append(a)
        store.add_ranking(cid, [by_rank[r] for r in sorted(by_rank)], labeler=who, key=key)
        n += 1
    return n


def read_rankings(path: str | Path) -> list[RankingRow]:
    """Every ranking of a rankings or pairs JSONL file; bad lines are UserErrors with their
    line number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such rankings file; make one with `tinylm feedback "
                        "collect` then `tinylm feedback export`")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            rows.append(row_from_line(data, f"{path}:{n}"))
    if not rows:
        raise UserError(f"{path}: the file holds no rankings")
    return rows


def row_from_line(data: dict, where: str) -> RankingRow:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object")
    if "chosen" in data and "rejected" in data:
        return _pair_row(data, where)
    if not all(k in data for k in ("messages", "answers", "ranks")):
        raise UserError(f'{where}: expected "messages", "answers" and "ranks" (a ranking), '
                        'or "prompt", "chosen" and "rejected" (a pair)')
    messages = check_messages(data["messages"], where)
    answers, ranks = data["answers"], data["ranks"]
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise UserError(f'{where}: "answers" must be a list of strings')
    if not isinstance(ranks, list) or len(ranks) != len(answers) or not all(
            isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks):
        raise UserError(f'{where}: "ranks" must give each of the {len(answers)} answers a '
                        "rank (0 = best, equal = tied)")
    try:
        check_answers(answers)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    meta = {k: v for k, v in data.items() if k not in ("messages", "answers", "ranks")}
    return RankingRow(messages, answers, ranks, meta)


def _pair_row(data: dict, where: str) -> RankingRow:
    prompt = data.get("prompt", [])
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                else check_messages(prompt, where))

    def content(side: str) -> str:
        v = data[side]
        if isinstance(v, str):
            return v
        turns = check_messages(v, where)
        return turns[-1]["content"]

    answers = [content("chosen"), content("rejected")]
    try:
        check_answers(answers)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return RankingRow(messages, answers, [0, 1], {})
