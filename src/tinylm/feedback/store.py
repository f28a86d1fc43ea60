"""The feedback store: prompts, the answers a policy sampled for them, people's and guideline
labelers' rankings of those answers, "all answers are bad" flags and demonstrations.

    store = Store("runs/feedback.db")                  # or any SQLAlchemy URL
    pid = store.add_prompt([{"role": "user", "content": "Tell me a story about ..."}])
    cid, ids = store.add_answers(pid, ["Once ...", "One day ...", ...], policy="runs/sft",
                                 sampling={"temperature": 1.0}, round=0)
    store.add_ranking(cid, [[ids[2]], [ids[0], ids[3]], [ids[1]]], labeler="request")

The tables:
- `Prompt`: a conversation to answer (its messages as JSON, unique by content) and free
  metadata (the make-chat rows' task/name/object).
- `Comparison`: the K >= 2 distinct answers sampled together for one prompt and shown
  together; a ranking always ranks a whole comparison, so "misses an answer" has a meaning.
- `Answer`: one sampled answer, with the policy run, sampling settings, round and reward model
  that produced it.
- `Ranking`: one labeler's full order of a comparison's answers, best first, as tiers (answers
  in one tier are tied); or an "all bad" flag (then the order may be empty). Its idempotency
  key is unique, so a double submit stores one ranking: the same key a second time returns the
  first ranking's id. Without a key, one is derived from (comparison, labeler, order, flag).
- `Demonstration`: a labeler's own answer to a prompt (SFT data).

Several labelers' rankings of one comparison are merged by ranked pairs (Tideman's method,
as OpenAssistant merges its rankings): count how many labelers prefer a over b for every
pair, lock in pairs by decreasing margin unless one would close a cycle; the locked graph,
layered, is the merged order. `agreement()` is the share of answer pairs that two labelers
both ordered strictly and ordered the same way.

SQLite (the default) runs in WAL mode with a busy timeout, and every transaction begins
IMMEDIATE (takes the write lock up front): a deferred transaction that reads and then writes
can fail with "database is locked" at once, without waiting, when another writer got in
between; with IMMEDIATE every writer waits its turn for up to the busy timeout instead.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from tinylm.data.chat import check_messages
from tinylm.errors import UserError

DEFAULT_DB = "runs/feedback.db"
BUSY_TIMEOUT_S = 30.0


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Prompt(Base):
    __tablename__ = "prompts"
    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the messages
    messages: Mapped[list[Any]] = mapped_column(JSON)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class Comparison(Base):
    __tablename__ = "comparisons"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    answers: Mapped[list[Answer]] = relationship(order_by="Answer.position")


class Answer(Base):
    __tablename__ = "answers"
    id: Mapped[int] = mapped_column(primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # order shown, 0..K-1
    text: Mapped[str] = mapped_column(Text)
    policy: Mapped[str] = mapped_column(String(500), default="")  # the run that sampled it
    sampling: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    round: Mapped[int] = mapped_column(Integer, default=0)
    reward_model: Mapped[str] = mapped_column(String(500), default="")  # "" = none yet
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class Ranking(Base):
    __tablename__ = "rankings"
    id: Mapped[int] = mapped_column(primary_key=True)
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id"), index=True)
    labeler: Mapped[str] = mapped_column(String(200), index=True)
    order: Mapped[list[Any]] = mapped_column(JSON)  # tiers of answer ids, best first
    all_bad: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    round: Mapped[int] = mapped_column(Integer, default=0)
    policy: Mapped[str] = mapped_column(String(500), default="")
    reward_model: Mapped[str] = mapped_column(String(500), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class Demonstration(Base):
    __tablename__ = "demonstrations"
    id: Mapped[int] = mapped_column(primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id"), index=True)
    labeler: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    round: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


@dataclass
class RankedComparison:
    """A comparison with its prompt, answers and rankings, as export and training read it."""

    comparison_id: int
    messages: list[dict]
    meta: dict
    answers: list[str]  # in the order shown
    answer_ids: list[int]
    ranks: list[int]  # merged over labelers: 0 = best, equal numbers = tied
    labelers: list[str]
    policy: str
    round: int


def database_url(db: str | Path) -> str:
    """`db` as an SQLAlchemy URL: a URL as is ("postgresql://..."), a path as a SQLite file."""
    db = str(db)
    return db if "://" in db else f"sqlite:///{db}"


def prompt_key(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()


class Store:
    """The feedback database. Every method runs in its own transaction and is safe to call
    from many threads (one Store) or processes (one Store each) at once."""

    def __init__(self, db: str | Path = DEFAULT_DB, busy_timeout: float = BUSY_TIMEOUT_S,
                 create_folder: bool = False):
        """create_folder: make a SQLite file's missing folder (`feedback collect`, which
        starts a database); else a missing folder is an error, so that a mistyped path to an
        existing database is not read as a new, empty one."""
        url = database_url(db)
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            path = Path(url.removeprefix("sqlite:///"))
            if create_folder:
                path.parent.mkdir(parents=True, exist_ok=True)
            if not path.parent.is_dir():
                raise UserError(f"cannot create the feedback database {path}: folder "
                                f"{path.parent} does not exist")
        try:
            self.engine = create_engine(url, connect_args=(
                {"timeout": busy_timeout} if url.startswith("sqlite") else {}))
        except Exception as e:  # a malformed URL or a missing database driver
            raise UserError(f"cannot open the feedback database {db!r} ({e}); give a SQLite "
                            "path or an SQLAlchemy URL") from None
        if self.engine.dialect.name == "sqlite":
            _sqlite_pragmas(self.engine, busy_timeout)
        Base.metadata.create_all(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as s, s.begin():
            yield s

    # -- writing --
    def add_prompt(self, messages: list[dict] | str, meta: dict | None = None) -> int:
        """The id of the prompt (a conversation, or one user message as text); the same
        messages a second time give the same id."""
        messages = _as_messages(messages)
        key = prompt_key(messages)
        try:
            with self.session() as s:
                found = s.scalar(select(Prompt.id).where(Prompt.key == key))
                if found is not None:
                    return found
                p = Prompt(key=key, messages=messages, meta=meta or {})
                s.add(p)
                s.flush()
                return p.id
        except IntegrityError:  # another writer added it between our look and our insert
            with self.session() as s:
                return s.scalar(select(Prompt.id).where(Prompt.key == key))

    def add_answers(self, prompt_id: int, texts: Sequence[str], policy: str = "",
                    sampling: dict | None = None, round: int = 0, reward_model: str = ""
                    ) -> tuple[int, list[int]]:
        """Store K >= 2 distinct answers sampled together for a prompt, as one comparison;
        returns (comparison id, answer ids in the order given)."""
        texts = list(texts)
        check_answers(texts)
        with self.session() as s:
            if s.get(Prompt, prompt_id) is None:
                raise UserError(f"no prompt {prompt_id} in the feedback store")
            c = Comparison(prompt_id=prompt_id)
            c.answers = [Answer(position=i, text=t, policy=str(policy), sampling=sampling or {},
                                round=round, reward_model=str(reward_model))
                         for i, t in enumerate(texts)]
            s.add(c)
            s.flush()
            return c.id, [a.id for a in c.answers]

    def add_ranking(self, comparison_id: int, order: Sequence, labeler: str,
                    key: str | None = None, all_bad: bool = False, round: int | None = None,
                    policy: str | None = None, reward_model: str | None = None) -> int:
        """Store a labeler's ranking of every answer of a comparison; returns its id.

        order: answer ids best first; an item that is a list is a tier of tied answers
        ([[3], [1, 2], [4]]: 3 best, 1 and 2 tied, 4 worst). With all_bad=True the order may
        be empty. key: the idempotency key (a second submit with it returns the first id).
        round, policy, reward_model default to those that made the answers."""
        tiers = normalize_order(order)
        key = key or _derived_key(comparison_id, labeler, tiers, all_bad)
        try:
            with self.session() as s:
                found = s.scalar(select(Ranking.id).where(Ranking.idempotency_key == key))
                if found is not None:
                    return found
                c = s.get(Comparison, comparison_id)
                if c is None:
                    raise UserError(f"no comparison {comparison_id} in the feedback store")
                if tiers or not all_bad:
                    check_order(tiers, [a.id for a in c.answers])
                first = c.answers[0]
                r = Ranking(comparison_id=comparison_id, labeler=labeler, order=tiers,
                            all_bad=all_bad, idempotency_key=key,
                            round=first.round if round is None else round,
                            policy=first.policy if policy is None else policy,
                            reward_model=(first.reward_model if reward_model is None
                                          else reward_model))
                s.add(r)
                s.flush()
                return r.id
        except IntegrityError:  # a database without BEGIN IMMEDIATE: the other submit won
            with self.session() as s:
                return s.scalar(select(Ranking.id).where(Ranking.idempotency_key == key))

    def add_demonstration(self, prompt_id: int, text_: str, labeler: str,
                          key: str | None = None, round: int = 0) -> int:
        """A labeler's own better answer to a prompt (SFT data); returns its id."""
        if not text_.strip():
            raise UserError("the demonstration is empty; write an answer")
        key = key or hashlib.sha256(f"{prompt_id}\0{labeler}\0{text_}".encode()).hexdigest()
        with self.session() as s:
            found = s.scalar(select(Demonstration.id)
                             .where(Demonstration.idempotency_key == key))
            if found is not None:
                return found
            if s.get(Prompt, prompt_id) is None:
                raise UserError(f"no prompt {prompt_id} in the feedback store")
            d = Demonstration(prompt_id=prompt_id, labeler=labeler, text=text_,
                              idempotency_key=key, round=round)
            s.add(d)
            s.flush()
            return d.id

    # -- reading --
    def count(self, table: type[Base]) -> int:
        with self.session() as s:
            return s.scalar(select(func.count()).select_from(table))

    def ranking_id(self, key: str) -> int | None:
        """The id of the ranking stored under idempotency key `key`, or None."""
        with self.session() as s:
            return s.scalar(select(Ranking.id).where(Ranking.idempotency_key == key))

    def rankings(self, comparison_id: int | None = None) -> list[Ranking]:
        with self.session() as s:
            q = select(Ranking).order_by(Ranking.id)
            if comparison_id is not None:
                q = q.where(Ranking.comparison_id == comparison_id)
            return list(s.scalars(q))

    def ranked_comparisons(self, labeler: str | None = None) -> list[RankedComparison]:
        """Every comparison with at least one ranking (of `labeler`, if given) that orders
        its answers, the labelers' rankings merged by ranked pairs."""
        out = []
        with self.session() as s:
            q = select(Ranking)
            if labeler is not None:
                q = q.where(Ranking.labeler == labeler)
            by_comparison: dict[int, list[Ranking]] = defaultdict(list)
            for r in s.scalars(q.order_by(Ranking.id)):
                if r.order:
                    by_comparison[r.comparison_id].append(r)
            for cid, rs in by_comparison.items():
                c = s.get(Comparison, cid)
                p = s.get(Prompt, c.prompt_id)
                ids = [a.id for a in c.answers]
                merged = merge_rankings([r.order for r in rs], ids)
                rank_of = {a: t for t, tier in enumerate(merged) for a in tier}
                out.append(RankedComparison(
                    cid, p.messages, p.meta, [a.text for a in c.answers], ids,
                    [rank_of[a] for a in ids], sorted({r.labeler for r in rs}),
                    c.answers[0].policy, c.answers[0].round))
        return out

    def agreement(self) -> dict[str, float]:
        """Inter-labeler agreement over comparisons ranked by two or more labelers: the share
        of answer pairs that both of two labelers ordered strictly and the same way."""
        by_comparison: dict[int, dict[str, list]] = defaultdict(dict)
        for r in self.rankings():
            if r.order:
                by_comparison[r.comparison_id][r.labeler] = r.order  # a labeler's latest
        agree = total = shared = 0
        for orders in by_comparison.values():
            if len(orders) < 2:
                continue
            shared += 1
            for a, b in combinations(orders.values(), 2):
                pa, pb = strict_pairs(a), strict_pairs(b)
                both = {frozenset(p) for p in pa} & {frozenset(p) for p in pb}
                total += len(both)
                agree += len(pa & pb)
        return {"comparisons": shared, "pairs": total,
                "agreement": agree / total if total else float("nan")}

    def integrity_check(self) -> str:
        """SQLite's own check of the file ("ok" when sound); "ok" for other databases."""
        if self.engine.dialect.name != "sqlite":
            return "ok"
        with self.engine.connect() as conn:
            return conn.exec_driver_sql("PRAGMA integrity_check").scalar()


# -- validation -------------------------------------------------------------------------------
def _as_messages(messages: list[dict] | str) -> list[dict]:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    messages = check_messages(messages, "prompt")
    if not any(m["content"].strip() for m in messages):
        raise UserError("the prompt is empty; give it a user message with some text")
    return messages


def check_answers(texts: list[str]) -> None:
    """K >= 2 answers, none repeated (a ranking of two equal texts says nothing)."""
    if len(texts) < 2:
        raise UserError(f"a comparison needs at least 2 answers to rank, got {len(texts)}; "
                        "sample K >= 2")
    seen: dict[str, int] = {}
    for i, t in enumerate(texts):
        if t in seen:
            raise UserError(f"answers {seen[t] + 1} and {i + 1} are the same text; sample "
                            "again (higher temperature) or drop the duplicate")
        seen[t] = i


def normalize_order(order: Sequence) -> list[list[int]]:
    """[3, [1, 2], 4] or [[3], [1, 2], [4]] -> [[3], [1, 2], [4]] (tiers, best first)."""
    if not isinstance(order, list | tuple):
        raise UserError("a ranking's order must be a list of answer ids, best first")
    tiers = []
    for item in order:
        tier = list(item) if isinstance(item, list | tuple) else [item]
        if not tier or not all(isinstance(a, int) and not isinstance(a, bool) for a in tier):
            raise UserError(f"ranking tier {item!r} must be an answer id or a non-empty list "
                            "of answer ids")
        tiers.append(tier)
    return tiers


def check_order(tiers: list[list[int]], answer_ids: list[int]) -> None:
    """The ranking names every answer of the comparison exactly once."""
    flat = [a for tier in tiers for a in tier]
    repeated = sorted({a for a in flat if flat.count(a) > 1})
    if repeated:
        raise UserError(f"the ranking names answer {repeated[0]} more than once; rank each "
                        "answer once (put tied answers in one tier)")
    missing = [a for a in answer_ids if a not in flat]
    if missing:
        raise UserError(f"the ranking misses answer {missing[0]}; rank all {len(answer_ids)} "
                        "answers of the comparison")
    extra = [a for a in flat if a not in answer_ids]
    if extra:
        raise UserError(f"answer {extra[0]} is not one of this comparison's answers "
                        f"{answer_ids}")


def _derived_key(comparison_id: int, labeler: str, tiers: list, all_bad: bool) -> str:
    raw = json.dumps([comparison_id, labeler, tiers, all_bad])
    return "auto:" + hashlib.sha256(raw.encode()).hexdigest()


# -- merging ----------------------------------------------------------------------------------
def strict_pairs(tiers: list[list[int]]) -> set[tuple[int, int]]:
    """(better, worse) for every pair the ranking orders strictly; ties give none."""
    return {(a, b) for i, hi in enumerate(tiers) for lo in tiers[i + 1:]
            for a in hi for b in lo}


def merge_rankings(orders: list[list[list[int]]], answer_ids: list[int]) -> list[list[int]]:
    """Several rankings of the same answers -> one, by ranked pairs (Tideman's method, as in
    OpenAssistant's ranking merge). Pairs are locked by decreasing margin (voters preferring a
    over b minus those preferring b over a; ties by answer order), skipping any that would
    close a cycle; the result is the locked graph layered: a tier is every answer no unplaced
    answer beats. Equal votes for both sides lock nothing, so such answers can share a tier."""
    votes: dict[tuple[int, int], int] = defaultdict(int)
    for tiers in orders:
        for pair in strict_pairs(tiers):
            votes[pair] += 1
    margins = sorted(((votes[(a, b)] - votes[(b, a)], answer_ids.index(a),
                       answer_ids.index(b), a, b)
                      for a in answer_ids for b in answer_ids
                      if a != b and votes[(a, b)] > votes[(b, a)]),
                     key=lambda m: (-m[0], m[1], m[2]))
    beats: dict[int, set[int]] = {a: set() for a in answer_ids}
    for *_, a, b in margins:
        if not _reaches(beats, b, a):
            beats[a].add(b)
    placed: list[list[int]] = []
    left = list(answer_ids)
    while left:
        tier = [a for a in left if not any(a in beats[o] for o in left)]
        placed.append(tier)
        left = [a for a in left if a not in tier]
    return placed


def _reaches(beats: dict[int, set[int]], start: int, goal: int) -> bool:
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(beats[node])
    return False


def _sqlite_pragmas(engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")  # an acknowledged submit survives power loss
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")


__all__ = ["Store", "Prompt", "Comparison", "Answer", "Ranking", "Demonstration",
           "RankedComparison", "merge_rankings", "strict_pairs", "check_answers",
           "check_order", "normalize_order", "database_url"]
