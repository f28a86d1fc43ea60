"""The ranking page `/label`: people rank K sampled answers of one prompt, best first.

Mounted on the server by `create_app(run, ..., db=...)` (`tinylm serve`), or run on its own
with a prompts file by `tinylm label --run RUN --prompts FILE` (`serve_label`). Routes:

    GET  /label                 the page (plain HTML/CSS/JS: label.html, label.js, label.css)
    GET  /v1/label/next         the next comparison for a labeler: a prompt and its K answers;
                                answers are sampled through the server's scheduler (the one
                                engine) when the store has a prompt with none yet
    POST /v1/label/rankings     a ranking (tiers of answer ids, best first), or "all bad",
                                and optionally a demonstration (the labeler's better answer)
    POST /v1/label/skip         skip a comparison, with a reason
    GET  /v1/label/stats        progress and per-labeler counts, agreement between labelers

Every write goes through the feedback store (feedback/store.py), whose checks refuse a ranking
that misses, repeats or invents an answer (a 400 from the server's UserError handler, nothing
stored) and whose idempotency keys make a double submit store one ranking: the page makes one
key per shown comparison and sends it again on a retry, so a submit whose reply was lost (the
server died after the commit) is stored once however often it is resent.

Skips live in a small table of their own (`label_skips`, created beside the store's tables in
the same database), because a skip is a fact about the page's queue, not feedback for training.
The store is opened on first use, so a server whose runs/ folder lacks a database starts
without creating one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field, Strict
from sqlalchemy import DateTime, Integer, String, Text, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from starlette.concurrency import run_in_threadpool

from tinylm.data import chat
from tinylm.errors import UserError
from tinylm.feedback.collect import PromptRow, read_prompts
from tinylm.feedback.store import (
    DEFAULT_DB,
    Comparison,
    Demonstration,
    Prompt,
    Ranking,
    Store,
    check_answers,
)
from tinylm.infer.engine import SamplingParams
from tinylm.serve.app import CSP, STATIC, APIError, ApiKey, PageKey, merged

# A labeler's name: what the page shows and the store records; guideline labelers' names are
# reserved so that people's rankings never mix with a program's.
LABELER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
RESERVED = {"request", "sentiment", "textblob"}
RESAMPLE_TRIES = 3
# A database id: an integer (never "3" or true), within SQLite's 64 bits.
Id = Annotated[int, Strict(), Field(ge=0, lt=2**63)]


class SkipBase(DeclarativeBase):
    pass


class Skip(SkipBase):
    __tablename__ = "label_skips"
    id: Mapped[int] = mapped_column(primary_key=True)
    comparison_id: Mapped[int] = mapped_column(Integer, index=True)
    labeler: Mapped[str] = mapped_column(String(200), index=True)
    reason: Mapped[str] = mapped_column(Text)
    idempotency_key: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime, default=lambda: dt.datetime.now(dt.UTC).replace(tzinfo=None))


# --- request bodies ----------------------------------------------------------------------------
class RankingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comparison_id: Id
    labeler: str
    order: list[list[Id] | Id] = Field(default_factory=list,
                                         description="answer ids best first; a list = a tie")
    all_bad: bool = False
    demonstration: str | None = Field(None, max_length=20_000)
    key: str = Field(min_length=1, max_length=200, description="idempotency key")


class SkipBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    comparison_id: Id
    labeler: str
    reason: str = Field(min_length=1, max_length=2000)
    key: str = Field(min_length=1, max_length=200)


def check_labeler(name: str) -> str:
    name = name.strip()
    if not LABELER.match(name):
        raise APIError(400, f"labeler {name!r} is not a usable name: 1 to 64 letters, digits "
                            "or _ . @ -, starting with a letter or digit (open the page as "
                            "/label?labeler=NAME)", param="labeler")
    if name in RESERVED:
        raise APIError(400, f"labeler {name!r} is a guideline labeler's name; choose your own",
                       param="labeler")
    return name


# --- the desk: store, queue, sampling ----------------------------------------------------------
class LabelDesk:
    """The ranking page's state: the store (opened on first use), the answers' sampling
    settings, and a lock so two labelers asking at once do not sample the same prompt twice."""

    def __init__(self, served, db: str | Path | None = None, k: int = 4,
                 max_new_tokens: int = 64, temperature: float = 1.0, round: int = 0):
        if k < 2:
            raise UserError(f"--k {k}: a ranking needs at least 2 answers per prompt")
        # Default: feedback.db beside the run dir, which is runs/feedback.db (feedback
        # collect's default) for a run in runs/, and a scratch file for a run elsewhere.
        self.served, self.k = served, k
        self.db = db or Path(served.run).resolve().parent / Path(DEFAULT_DB).name
        self.max_new_tokens, self.temperature, self.round = max_new_tokens, temperature, round
        self._store: Store | None = None
        self._sampling = asyncio.Lock()

    @property
    def store(self) -> Store:
        if self._store is None:
            store = Store(self.db)
            SkipBase.metadata.create_all(store.engine)
            self._store = store
        return self._store

    def add_prompts(self, rows: list[PromptRow]) -> int:
        """Put the prompts of a file in the store (each once); they are sampled when asked."""
        return len({self.store.add_prompt(r.messages, r.meta) for r in rows})

    # -- reading (plain functions: they run in the thread pool) --
    def done_by(self, labeler: str) -> set[int]:
        with self.store.session() as s:
            ranked = s.scalars(select(Ranking.comparison_id).where(Ranking.labeler == labeler))
            skipped = s.scalars(select(Skip.comparison_id).where(Skip.labeler == labeler))
            return set(ranked) | set(skipped)

    def pick(self, labeler: str) -> dict | None:
        """The comparison this labeler has neither ranked nor skipped with the fewest
        rankings so far (so several people's rankings of one prompt accumulate evenly)."""
        done = self.done_by(labeler)
        with self.store.session() as s:
            counts = Counter(s.scalars(select(Ranking.comparison_id)))
            ids = [c for c in s.scalars(select(Comparison.id).order_by(Comparison.id))
                   if c not in done]
            if not ids:
                return None
            best = min(ids, key=lambda c: (counts[c], c))
            return self.describe(s, s.get(Comparison, best))

    @staticmethod
    def describe(s, c: Comparison) -> dict:
        p = s.get(Prompt, c.prompt_id)
        return {"comparison_id": c.id, "prompt_id": p.id, "messages": p.messages,
                "answers": [{"id": a.id, "text": a.text} for a in c.answers],
                "policy": c.answers[0].policy, "round": c.answers[0].round}

    def unsampled_prompt(self) -> tuple[int, list[dict]] | None:
        with self.store.session() as s:
            sampled = select(Comparison.prompt_id)
            p = s.scalars(select(Prompt).where(Prompt.id.not_in(sampled))
                          .order_by(Prompt.id).limit(1)).first()
            return (p.id, p.messages) if p is not None else None

    def stats(self, labeler: str | None) -> dict:
        st = self.store
        with st.session() as s:
            comparisons = s.scalar(select(func.count()).select_from(Comparison))
            prompts = s.scalar(select(func.count()).select_from(Prompt))
            per: dict[str, dict[str, int]] = {}
            for table, what in ((Ranking, "rankings"), (Skip, "skips"),
                                (Demonstration, "demonstrations")):
                q = select(table.labeler, func.count()).group_by(table.labeler)
                for name, n in s.execute(q):
                    per.setdefault(name, {"rankings": 0, "skips": 0, "demonstrations": 0})
                    per[name][what] = n
            all_bad = s.scalar(select(func.count()).select_from(Ranking)
                               .where(Ranking.all_bad.is_(True)))
        out: dict[str, Any] = {"prompts": prompts, "comparisons": comparisons,
                               "all_bad": all_bad, "labelers": per,
                               "agreement": _finite(st.agreement())}
        if labeler:
            done = len(self.done_by(labeler))
            out["me"] = {"labeler": labeler, "done": done,
                         "left": max(comparisons - done, 0) + (prompts - self.sampled())}
        return out

    def sampled(self) -> int:
        with self.store.session() as s:
            return s.scalar(select(func.count(func.distinct(Comparison.prompt_id))))

    # -- writing --
    def rank(self, body: RankingBody) -> dict:
        labeler = check_labeler(body.labeler)
        demo = (body.demonstration or "").strip()
        if body.all_bad and body.order:
            raise APIError(400, '"all bad" stores no order: send an empty order with it',
                           param="order")
        if not body.all_bad and not body.order:
            raise APIError(400, "the ranking is empty: order the answers, or mark them all bad",
                           param="order")
        st = self.store
        rid = st.add_ranking(body.comparison_id, body.order, labeler=labeler, key=body.key,
                             all_bad=body.all_bad)
        out = {"ranking_id": rid, "demonstration_id": None}
        if demo:  # after the ranking: a refused ranking stores no demonstration either
            with st.session() as s:
                prompt_id = s.get(Comparison, body.comparison_id).prompt_id
            out["demonstration_id"] = st.add_demonstration(prompt_id, demo, labeler,
                                                           key=body.key + ":demo",
                                                           round=self.round)
        return out

    def skip(self, body: SkipBody) -> dict:
        labeler = check_labeler(body.labeler)
        with self.store.session() as s:
            found = s.scalar(select(Skip.id).where(Skip.idempotency_key == body.key))
            if found is not None:
                return {"skip_id": found}
            if s.get(Comparison, body.comparison_id) is None:
                raise APIError(400, f"no comparison {body.comparison_id} in the feedback store",
                               param="comparison_id")
            row = Skip(comparison_id=body.comparison_id, labeler=labeler,
                       reason=body.reason.strip(), idempotency_key=body.key)
            s.add(row)
            s.flush()
            return {"skip_id": row.id}

    # -- sampling through the server's scheduler --
    async def sample(self, prompt_id: int, messages: list[dict]) -> None:
        """K distinct answers for a prompt, from the one engine's scheduler (the rows join the
        server's continuous batch), stored as one comparison."""
        served = self.served
        if served.chat_problem:
            raise APIError(400, served.chat_problem)
        ids = chat.render(served.tok, messages, served.template, add_generation_prompt=True).ids
        room = served.block - len(ids)
        if room < 8:
            raise APIError(400, f"prompt {prompt_id} is {len(ids)} tokens with the template, "
                                f"too long for the model's {served.block}-token window")
        answers: list[str] = []
        for attempt in range(RESAMPLE_TRIES):
            want = self.k - len(answers)
            if want <= 0:
                break
            params = [SamplingParams(max_new_tokens=min(self.max_new_tokens, room),
                                     temperature=self.temperature,
                                     seed=(prompt_id * 7919 + attempt) * 64 + j,
                                     stop_token_ids=list(served.turn_end))
                      for j in range(want)]
            rows = [served.scheduler.submit(ids, p)[0] for p in params]
            async for _ in merged(rows, None):
                pass
            for r in rows:
                text = r.result().text.strip()
                if text and text not in answers:
                    answers.append(text)
        if len(answers) < 2:
            raise APIError(503, f"the model gave fewer than 2 distinct answers to prompt "
                                f"{prompt_id}; raise the temperature", code="no_answers")
        check_answers(answers)
        sampling = {"k": self.k, "max_new_tokens": self.max_new_tokens,
                    "temperature": self.temperature, "source": "label"}
        await run_in_threadpool(self.store.add_answers, prompt_id, answers[: self.k],
                                str(served.run), sampling, self.round)

    async def next_for(self, labeler: str) -> dict | None:
        found = await run_in_threadpool(self.pick, labeler)
        if found is not None:
            return found
        async with self._sampling:
            found = await run_in_threadpool(self.pick, labeler)  # another request sampled
            if found is not None:
                return found
            todo = await run_in_threadpool(self.unsampled_prompt)
            if todo is None:
                return None
            await self.sample(*todo)
        return await run_in_threadpool(self.pick, labeler)


def _finite(agreement: dict) -> dict:
    a = agreement.get("agreement")
    return {**agreement, "agreement": a if a == a else None}  # NaN is no JSON


# --- routes ------------------------------------------------------------------------------------
def router(desk: LabelDesk) -> APIRouter:
    r = APIRouter(tags=["label"])

    @r.get("/label", include_in_schema=False)
    async def label_page(_: PageKey):
        return FileResponse(STATIC / "label.html", headers={
            "Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
            "Cache-Control": "no-cache"})

    @r.get("/v1/label/next")
    async def next_comparison(_: ApiKey, labeler: str = Query(...)) -> dict:
        """The next comparison to rank, or `{"comparison": null}` when none is left."""
        name = check_labeler(labeler)
        return {"comparison": await desk.next_for(name),
                "stats": await run_in_threadpool(desk.stats, name)}

    @r.post("/v1/label/rankings")
    def submit_ranking(body: RankingBody, _: ApiKey) -> dict:
        return desk.rank(body)

    @r.post("/v1/label/skip")
    def submit_skip(body: SkipBody, _: ApiKey) -> dict:
        return desk.skip(body)

    @r.get("/v1/label/stats")
    def label_stats(_: ApiKey, labeler: str | None = None) -> dict:
        return desk.stats(check_labeler(labeler) if labeler else None)

    return r


def mount(app: FastAPI, db: str | Path | None = None, **desk_args) -> LabelDesk:
    """Add the ranking page to a server made by create_app; the desk is app.state.label."""
    desk = LabelDesk(app.state.served, db, **desk_args)
    app.include_router(router(desk))
    app.state.label = desk
    return desk


def serve_label(run: str | Path, prompts: str | Path, db: str | Path = DEFAULT_DB, k: int = 4,
                host: str = "127.0.0.1", port: int = 8000, api_keys=(), insecure: bool = False,
                dtype: str | None = "auto", max_new_tokens: int = 64,
                temperature: float = 1.0) -> None:
    """`tinylm label`: the server for `run` with its prompts file queued on /label."""
    import uvicorn

    from tinylm.serve.app import check_bind, create_app

    check_bind(host, api_keys, insecure)
    if k < 2:
        raise UserError(f"--k {k}: a ranking needs at least 2 answers per prompt")
    if not (Path(run) / "model.safetensors").is_file():
        raise UserError(f"{run}: not a run dir with a model (no model.safetensors)")
    rows = read_prompts(prompts)
    app = create_app(run, api_keys, dtype=dtype, db=db)
    desk: LabelDesk = app.state.label
    desk.k, desk.max_new_tokens, desk.temperature = k, max_new_tokens, temperature
    n = desk.add_prompts(rows)
    print(f"ranking page for {app.state.served.name} on http://{host}:{port}/label  "
          f"({n} prompts, K={k}, database {db})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
