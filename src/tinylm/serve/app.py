"""`tinylm serve`: an OpenAI-compatible API, a chat page and an autocomplete page for a run.

One FastAPI app over one `Scheduler` (infer/engine.py): every request becomes rows of the one
continuously batched decode loop, which runs in the scheduler's thread (`workers=0`) or in a
decode worker process of its own behind a proxy with the Scheduler's API (`workers=1`,
serve/worker.py), while the asyncio event loop here only parses, validates and streams
(`async for event in request`, no thread per request). Routes:

    GET  /v1/models                 the run, under its folder's name
    POST /v1/completions            text, texts or token-id prompts; n, stream, echo, logprobs
    POST /v1/chat/completions       messages rendered by the one chat renderer (data/chat.py)
    POST /v1/suggest                the next few likely words (the autocomplete page's call)
    GET  /health                    liveness, without a key
    GET  /metrics                   Prometheus text: TTFT, inter-token latency, queue sizes
    GET  /, /complete, /static/...  the pages (plain HTML/CSS/JS, no build step)

Safety, because a server is reachable by people who are not its owner:
- errors have OpenAI's shape `{"error": {"message", "type", "param", "code"}}` with a 4xx code
  for anything a client did; a bug is a 500 with a fixed message (the trace goes to the log,
  never to the client);
- caps on n, max_tokens, prompt length (the window: 400 `context_length_exceeded`), prompts
  per request and body size (413, checked while the body arrives, not after);
- a full queue is a 503 and too many concurrent requests for one key a 429, both with
  Retry-After;
- with keys, every route but /health needs one: `Authorization: Bearer KEY` from API clients,
  or HTTP Basic with the key as password, which is what a browser can send for a page (it asks
  for it once and then sends it with the page's own API calls);
- `serve()` refuses to bind beyond loopback without a key unless `insecure`;
- static files are looked up in a table of the folder's files, so no path can leave it;
- pages carry a Content-Security-Policy without inline script, and their JS inserts model
  output as text (`textContent`), never as HTML.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import ipaddress
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPBearer
from starlette.exceptions import HTTPException

from tinylm import rundir
from tinylm.data import chat
from tinylm.errors import UserError
from tinylm.infer.chat import turn_end_ids
from tinylm.infer.engine import Engine, Event, QueueFull, SamplingParams, Scheduler
from tinylm.serve.metrics import Metrics
from tinylm.serve.schemas import (
    ChatRequest,
    CompletionRequest,
    Sampling,
    SuggestRequest,
)
from tinylm.serve.worker import DecodeWorker, WorkerDied, decode_threads

log = logging.getLogger("tinylm.serve")
STATIC = Path(__file__).parent / "static"
PAGES = {"/": "chat.html", "/complete": "complete.html"}
# No inline script or style anywhere, so injected markup could not run even if it got in.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


# Where the decode loop runs by default: 1 = a decode worker process (serve/worker.py), 0 = a
# thread of the server's process. On the idle 2-core machine the worker gave 1543 tok/s at 8
# clients against 1285 in-process (3.31x against 2.76x transformers serve's, in the same turns:
# benchmarks/serve_load.py --workers 1,0; docs/serving.md, "The decode worker"), because the
# decode loop and the event loop no longer take turns on one GIL. Under heavy load from other
# processes its two extra hops cost time slices and the two tie or the worker loses.
DEFAULT_WORKERS = 1


@dataclass
class Limits:
    """What one request, and one key, may ask of the server."""

    max_n: int = 16  # choices per prompt
    max_tokens: int = 4096  # new tokens per choice (the window caps it further)
    max_rows: int = 64  # prompts x n in one request
    max_body_bytes: int = 1 << 20
    per_key_concurrency: int = 64  # requests in flight per key (per client address without)
    max_batch: int = 64  # rows decoding together
    max_waiting: int = 256  # rows queued for a place in the batch


# --- errors ------------------------------------------------------------------------------------
class APIError(Exception):
    """An error a client caused (or a refusal: busy, full), in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class BodyTooLarge(HTTPException):
    # An HTTPException, because FastAPI turns any other exception raised while it reads a
    # body into a 400 "error parsing the body".
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


def context_error(prompt: int, new: int, block: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {block} tokens. However, you "
                         f"requested {prompt + new} tokens ({prompt} in the prompt, {new} for "
                         f"the completion). Shorten the prompt or lower max_tokens.",
                    param="max_tokens" if prompt < block else "prompt",
                    code="context_length_exceeded")


def worker_died(e: WorkerDied) -> APIError:
    """The decode worker is gone: not the client's doing, and retrying here will not help
    until the server restarts."""
    return APIError(503, f"the server cannot generate now: {e}", type="server_error",
                    code="worker_died")


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def reply(e: APIError) -> JSONResponse:
        metrics.rejected.inc(value=str(e.status))
        return e.response()

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError):
        return reply(e)

    @app.exception_handler(UserError)
    async def user_error(_: Request, e: UserError):
        return reply(APIError(400, str(e)))

    @app.exception_handler(QueueFull)
    async def queue_full(_: Request, e: QueueFull):
        return reply(APIError(503, f"the server is busy: {e}", type="server_busy",
                              code="queue_full", headers={"Retry-After": "1"}))

    @app.exception_handler(WorkerDied)
    async def died(_: Request, e: WorkerDied):
        return reply(worker_died(e))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return reply(APIError(400, "the body is not valid JSON "
                                  f"({first.get('ctx', {}).get('error', 'decode error')})",
                                  code="invalid_json"))
        what, where = first.get("msg", "invalid request"), ".".join(loc)
        return reply(APIError(400, f"{where}: {what}" if where else what,
                              param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException):
        kind = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        return reply(APIError(e.status_code, str(e.detail), code=kind.get(e.status_code),
                              headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):
        log.exception("error while serving %s %s", request.method, request.url.path)
        return reply(APIError(500, "internal server error (the server's log has the details)",
                              type="server_error"))


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, judged by its Content-Length before
    reading it and by counting while it arrives (a chunked body has no length)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            status = 413 if length.isdigit() else 400
            e = APIError(status, f"the request body is larger than {self.limit} bytes"
                         if status == 413 else "Content-Length is not a number")
            return await e.response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


# --- keys and fairness -------------------------------------------------------------------------
class Auth:
    """Checks the key of every route but /health. `Bearer KEY` (API clients) or Basic with KEY
    as the password (browsers, for the pages); compared in constant time."""

    def __init__(self, keys: Sequence[str]):
        self.keys = [k.encode() for k in keys]

    def key_of(self, request: Request) -> str | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return None
        elif scheme.lower() != "bearer":
            return None
        given = value.strip().encode()
        return value.strip() if any(hmac.compare_digest(given, k) for k in self.keys) else None

    def check(self, request: Request, page: bool = False) -> str:
        """The caller's identity for the concurrency limit: its key, or its address."""
        if not self.keys:
            return request.client.host if request.client else "-"
        key = self.key_of(request)
        if key is None:
            challenge = 'Basic realm="tinylm", charset="UTF-8"' if page else "Bearer"
            raise APIError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": challenge})
        return "key:" + key


class Lease:
    def __init__(self, counts: dict[str, int], key: str):
        self.counts, self.key, self.held = counts, key, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.counts[self.key] -= 1
            if not self.counts[self.key]:
                del self.counts[self.key]


class Limiter:
    """At most `limit` generation requests in flight per key; more get a 429."""

    def __init__(self, limit: int):
        self.limit, self.counts = limit, {}

    def acquire(self, key: str) -> Lease:
        if self.counts.get(key, 0) >= self.limit:
            raise APIError(429, f"too many concurrent requests for this key (limit "
                                f"{self.limit}); wait for one to finish",
                           type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": "1"})
        self.counts[key] = self.counts.get(key, 0) + 1
        return Lease(self.counts, key)


_bearer = HTTPBearer(auto_error=False, description="the server's --api-key")


# Async, though they do not await: FastAPI runs a plain `def` dependency in a worker thread,
# a thread hop (and a GIL hand-over) on every request's way to its first token.
async def api_key(request: Request, _: Annotated[Any, Depends(_bearer)]) -> str:
    return request.app.state.auth.check(request)


async def page_key(request: Request) -> str:
    return request.app.state.auth.check(request, page=True)


# Module-level: FastAPI resolves these (string) annotations in the module's namespace.
ApiKey = Annotated[str, Depends(api_key)]
PageKey = Annotated[str, Depends(page_key)]


# --- the served model --------------------------------------------------------------------------
class Served:
    """A run loaded for serving: scheduler, tokenizer, chat template, names.

    `workers=1`: the model, engine and scheduler live in a decode process of their own
    (serve/worker.py), so that the decode loop and this event loop do not take turns on one
    GIL; `scheduler` is then a `DecodeWorker`, with the Scheduler's API, and this process
    holds only the tokenizer. `workers=0`: the Scheduler runs in a thread of this process
    (`engine` is then its Engine; None with a worker). Default: DEFAULT_WORKERS."""

    def __init__(self, run: str | Path, limits: Limits, dtype: str | None = None,
                 name: str | None = None, workers: int = DEFAULT_WORKERS):
        import tinylm
        from tinylm.tokenizer import Tokenizer

        if workers not in (0, 1):
            raise UserError(f"workers={workers}: 0 (decode in the server's process) or 1 (in "
                            "a decode process of its own)")
        self.run = Path(run)
        self.engine: Engine | None = None
        self.worker: DecodeWorker | None = None
        if workers:
            self.worker = DecodeWorker(self.run, dtype, limits.max_batch, limits.max_waiting)
            self.scheduler: Scheduler | DecodeWorker = self.worker
            self.tok = Tokenizer.load(self.run / rundir.TOKENIZER)
            self.block, self.vocab = self.worker.block_size, self.worker.vocab_size
        else:
            model, self.tok = tinylm.load(self.run, family="gpt")
            self.engine = Engine(model, self.tok, max_batch=limits.max_batch, dtype=dtype)
            self.scheduler = Scheduler(self.engine, limits.max_batch, limits.max_waiting)
            self.block = self.engine.block_size
            self.vocab = model.config.vocab_size
        self.name = name or self.run.resolve().name
        self.created = int((self.run / "model.safetensors").stat().st_mtime)
        self.template = rundir.chat_template(self.run)
        try:
            self.turn_end = turn_end_ids(self.tok, self.template)
            self.chat_problem = None
        except UserError as e:
            self.turn_end, self.chat_problem = [], str(e)
        self._pieces: dict[int, str] = {}
        # Prompt logprobs run one at a time beside the scheduler's thread, off the event loop.
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tinylm-logprobs")

    def piece(self, token: int) -> str:
        """A token's own text (a lone byte of a longer character shows as U+FFFD)."""
        if token not in self._pieces:
            self._pieces[token] = self.tok.decode([token])
        return self._pieces[token]

    async def admitted(self, requests: Sequence) -> None:
        """Wait for the decode worker to take `requests` (its refusal of a prompt raises
        here, before a response starts); nothing to wait for in-process, where submit
        refuses at once."""
        if self.worker is not None:
            await self.worker.admitted(requests)

    async def prompt_logprobs(self, ids: list[int], top: int
                              ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """`Engine.prompt_logprobs`, off the event loop: in the worker, or in-process in a
        thread beside the scheduler's."""
        if self.worker is not None:
            return await self.worker.aprompt_logprobs(ids, top)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self.engine.prompt_logprobs, ids, top)

    @property
    def problem(self) -> str | None:
        """Why this server cannot generate now (its decode worker died); None when fine."""
        return self.worker.problem if self.worker is not None else None

    def close(self) -> None:
        self.scheduler.close()
        self.pool.shutdown(wait=False)


def sampling(body: Sampling, served: Served, max_new: int, logprobs: bool, top: int,
             stop_ids: Sequence[int] = ()) -> SamplingParams:
    bias = {}
    for key, value in (body.logit_bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias key {key!r} is not a token id",
                           param="logit_bias") from None
        if not 0 <= token < served.vocab:
            raise APIError(400, f"logit_bias names token {token}, outside the vocabulary "
                                f"(0..{served.vocab - 1})", param="logit_bias")
        bias[token] = value
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return SamplingParams(
        max_new_tokens=max_new, temperature=body.temperature, top_k=body.top_k,
        top_p=body.top_p, seed=body.seed, repetition_penalty=body.repetition_penalty,
        frequency_penalty=body.frequency_penalty, presence_penalty=body.presence_penalty,
        stop=stop, stop_token_ids=list(stop_ids), ignore_eos=body.ignore_eos,
        logprobs=logprobs, top_logprobs=top, logit_bias=bias)


def check_model(body: Sampling, served: Served) -> None:
    if body.model not in (served.name, str(served.run)):
        raise APIError(404, f"The model {body.model!r} does not exist; this server has "
                            f"{served.name!r} (GET /v1/models)", param="model",
                       code="model_not_found")


def new_tokens(asked: int | None, prompt_len: int, served: Served, limits: Limits) -> int:
    """max_tokens checked against the caps and the window; None = all the window leaves."""
    if asked is not None and asked > limits.max_tokens:
        raise APIError(400, f"max_tokens={asked} is over this server's cap of "
                            f"{limits.max_tokens}", param="max_tokens")
    if prompt_len > served.block:
        raise context_error(prompt_len, asked or 0, served.block)
    n = min(limits.max_tokens, served.block - prompt_len) if asked is None else asked
    if prompt_len + n > served.block or (asked is None and n < 1):
        raise context_error(prompt_len, max(n, 1), served.block)
    return n


async def submit_all(served: Served, prompts: list[list[int]], params: SamplingParams,
                     n: int):
    """Requests for every prompt (n each); all or none: a refusal cancels what was queued."""
    out = []
    try:
        for ids in prompts:
            out.append(served.scheduler.submit(ids, params, n) if params.max_new_tokens else
                       [None] * n)
        for reqs in out:
            await served.admitted(reqs)
    except BaseException:
        for reqs in out:
            for r in reqs:
                if r is not None:
                    r.cancel()
        raise
    return out


# --- rows: events in, metrics out --------------------------------------------------------------
async def merged_chunks(rows: list, metrics: Metrics | None
                        ) -> AsyncIterator[tuple[int, list[Event] | None]]:
    """(row, events) as the rows produce them, each list holding every event of that row that
    arrived since its last one (what a stream sends as one chunk: a reader that fell behind
    catches up at once), then (row, None) when each row ends. Leaving early (the client went
    away) cancels every row still running. `metrics` None: rows that are not a client's
    request (the autocomplete's), kept out of the latency figures."""
    itl = metrics.itl if metrics is not None else None
    try:
        if len(rows) == 1:  # the common case, without a queue and a task in between
            req = rows[0]
            if req is not None:
                last = None
                async for events in req.chunks():
                    last = _observe(itl, last, len(events))
                    yield 0, events
            yield 0, None
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, req) -> None:
            last = None
            try:
                if req is not None:
                    async for events in req.chunks():
                        last = _observe(itl, last, len(events))
                        queue.put_nowait((i, events))
            finally:
                queue.put_nowait((i, None))

        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(rows)]
        try:
            for _ in range(len(rows)):
                while (item := await queue.get())[1] is not None:
                    yield item
                yield item
            await asyncio.gather(*tasks)  # a scheduler failure surfaces here
        finally:
            for t in tasks:
                t.cancel()
    finally:
        for r in rows:
            if r is not None and not r.done:
                r.cancel()


def _observe(itl, last: float | None, n: int) -> float:
    """Record the inter-token latencies of `n` events that arrived together: the gap since
    the previous ones, then zeros (they leave the server in one chunk)."""
    now = time.perf_counter()
    if itl is not None:
        if last is not None:
            itl.observe(now - last)
        for _ in range(n - 1):
            itl.observe(0.0)
    return now


async def merged(rows: list, metrics: Metrics | None
                 ) -> AsyncIterator[tuple[int, Event | None]]:
    """`merged_chunks` one event at a time: (row, event), then (row, None) when a row ends."""
    async for i, events in merged_chunks(rows, metrics):
        if events is None:
            yield i, None
        else:
            for e in events:
                yield i, e


def finished(req, metrics: Metrics) -> tuple[str, int]:
    """(finish_reason, tokens generated) of an ended row; records its latencies."""
    if req is None:
        return "length", 0
    c = req.result(timeout=5)
    if req.t_first_token is not None:
        metrics.ttft.observe(req.t_first_token - req.t_submit)
    if req.t_done is not None:
        metrics.e2e.observe(req.t_done - req.t_submit)
    metrics.generated.inc(len(c.token_ids))
    metrics.finished.inc(value=c.finish_reason)
    return c.finish_reason, len(c.token_ids)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# --- logprob shapes ----------------------------------------------------------------------------
def completion_logprobs(served: Served, tokens: list[int], lps: list[float | None],
                        tops: list[list[tuple[int, float]] | None], offset: int) -> dict:
    """OpenAI's legacy completions shape: parallel lists, top_logprobs as {token: logprob}."""
    pieces = [served.piece(t) for t in tokens]
    offsets, at = [], offset
    for p in pieces:
        offsets.append(at)
        at += len(p)
    return {"tokens": pieces, "token_logprobs": lps,
            "top_logprobs": [None if top is None else {served.piece(t): lp for t, lp in top}
                             for top in tops],
            "text_offset": offsets}


def chat_logprob(served: Served, event: Event) -> dict:
    def entry(token: int, lp: float) -> dict:
        piece = served.piece(token)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

    return {**entry(event.token_id, event.logprob),
            "top_logprobs": [entry(t, lp) for t, lp in event.top_logprobs or []]}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# --- the app -----------------------------------------------------------------------------------
def create_app(run: str | Path, api_keys: Sequence[str] = (), limits: Limits | None = None,
               dtype: str | None = None, name: str | None = None,
               db: str | Path | None = None, workers: int = DEFAULT_WORKERS) -> FastAPI:
    """The server for one run. `api_keys` empty = open (loopback use). `db`: the feedback
    store behind the ranking page /label (default: feedback.db beside the run dir, which is
    runs/feedback.db for a run in runs/; opened on first use). `workers`: 1 = decode in a
    process of its own (started here, ready when this returns), 0 = in a thread of this
    process (`Served`; default DEFAULT_WORKERS)."""
    limits = limits or Limits()
    served = Served(run, limits, dtype, name, workers)
    metrics = Metrics({
        "tinylm_requests_running": ("rows decoding now", lambda: served.scheduler.running),
        "tinylm_requests_waiting": ("rows waiting for a place in the batch",
                                    lambda: served.scheduler.waiting),
    })
    auth, limiter = Auth(api_keys), Limiter(limits.per_key_concurrency)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        if served.worker is not None:  # its messages are read on this loop, no thread
            served.worker.attach(asyncio.get_running_loop())
        yield
        served.close()

    # No /docs or /redoc (they load their scripts from a CDN); /openapi.json is served below,
    # behind the key like everything but /health.
    app = FastAPI(title="tinylm", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None,
                  description=f"OpenAI-compatible API for the run {served.name}")
    app.state.served, app.state.metrics, app.state.limits = served, metrics, limits
    install_error_handlers(app, metrics)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    app.state.auth = auth
    from tinylm.serve import label  # here: label.py imports this module

    label.mount(app, db)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(_: ApiKey) -> dict:
        return app.openapi()

    @app.get("/health", tags=["server"])
    async def health():
        if (problem := served.problem) is not None:
            return JSONResponse({"status": "error", "error": problem}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", tags=["server"], response_class=PlainTextResponse)
    async def prometheus(_: ApiKey) -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created,
                "owned_by": "tinylm", "max_model_len": served.block}

    @app.get("/v1/models", tags=["openai"])
    async def models(_: ApiKey) -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", tags=["openai"])
    async def model(model: str, _: ApiKey) -> dict:
        if model not in (served.name, str(served.run)):
            raise APIError(404, f"The model {model!r} does not exist", param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/completions", tags=["openai"])
    async def completions(body: CompletionRequest, key: ApiKey):
        check_model(body, served)
        prompts = prompt_ids(body.prompt, served)
        if len(prompts) * body.n > limits.max_rows:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is over this server's "
                                f"cap of {limits.max_rows} choices per request", param="n")
        check_n(body.n, limits)
        # Every prompt must fit; with max_tokens null each gets what the longest one leaves.
        max_new = min(new_tokens(body.max_tokens, len(ids), served, limits) for ids in prompts)
        top = body.logprobs or 0
        params = sampling(body, served, max_new, body.logprobs is not None, top)
        lease = limiter.acquire(key)
        try:
            echoes = await echo_parts(body, prompts, served, top)
            groups = await submit_all(served, prompts, params, body.n)
        except BaseException:
            lease.release()
            raise
        metrics.prompt_tokens.inc(sum(map(len, prompts)))
        rows = [r for g in groups for r in g]
        run = CompletionRun(body, served, metrics, rows, echoes, prompts)
        if body.stream:
            return stream_response(run.stream(), lease)
        try:
            return await run.whole()
        finally:
            lease.release()

    @app.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(body: ChatRequest, key: ApiKey):
        check_model(body, served)
        if served.chat_problem:
            raise APIError(400, served.chat_problem, param="messages")
        check_n(body.n, limits)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content} for m in body.messages]
        ids = chat.render(served.tok, messages, served.template, add_generation_prompt=True).ids
        asked = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        max_new = new_tokens(asked, len(ids), served, limits)
        top = body.top_logprobs or 0
        if top and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = sampling(body, served, max_new, body.logprobs, top, served.turn_end)
        lease = limiter.acquire(key)
        try:
            rows = (await submit_all(served, [ids], params, body.n))[0]
        except BaseException:
            lease.release()
            raise
        metrics.prompt_tokens.inc(len(ids))
        run = ChatRun(body, served, metrics, rows, len(ids))
        if body.stream:
            return stream_response(run.stream(), lease)
        try:
            return await run.whole()
        finally:
            lease.release()

    @app.post("/v1/suggest", tags=["pages"])
    async def suggest(body: SuggestRequest, key: ApiKey) -> dict:
        """The likely next words after `text`, each with its probability: the autocomplete
        page's question (not part of OpenAI's API)."""
        lease = limiter.acquire(key)
        try:
            return {"words": await next_words(served, body)}
        finally:
            lease.release()

    def page(name: str) -> FileResponse:
        return FileResponse(STATIC / name, headers={"Content-Security-Policy": CSP,
                                                    "X-Content-Type-Options": "nosniff",
                                                    "Cache-Control": "no-cache"})

    static = {p.name: p.name for p in STATIC.iterdir() if p.is_file()}

    @app.get("/", include_in_schema=False)
    async def chat_page(_: PageKey):
        return page(PAGES["/"])

    @app.get("/complete", include_in_schema=False)
    async def complete_page(_: PageKey):
        return page(PAGES["/complete"])

    @app.get("/static/{name:path}", include_in_schema=False)
    async def static_file(name: str, _: PageKey):
        # A table of the folder's own files: "../x", "%2e%2e/x", absolute paths and links
        # out of the folder are simply not in it.
        if name not in static:
            raise APIError(404, "no such file", code="not_found")
        return page(static[name])

    return app


def check_n(n: int, limits: Limits) -> None:
    if n > limits.max_n:
        raise APIError(400, f"n={n} is over this server's cap of {limits.max_n}", param="n")


def prompt_ids(prompt, served: Served) -> list[list[int]]:
    """The prompts of a completions request as token ids: text, texts, ids, lists of ids."""
    if isinstance(prompt, str):
        prompts = [served.tok.encode(prompt)]
    elif prompt and isinstance(prompt[0], str):
        prompts = [served.tok.encode(p) for p in prompt]
    elif prompt and isinstance(prompt[0], list):
        prompts = [list(p) for p in prompt]
    else:
        prompts = [list(prompt)]
    for ids in prompts:
        bad = [t for t in ids if t >= served.vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary "
                                f"(0..{served.vocab - 1})", param="prompt")
    # An empty prompt starts as a document would; the engine does the same.
    return [ids or [served.tok.bos_id] for ids in prompts]


async def echo_parts(body: CompletionRequest, prompts: list[list[int]], served: Served,
                     top: int) -> list[tuple[str, dict | None]]:
    """Per prompt: the echoed text and (with logprobs) the prompt's logprobs."""
    if not body.echo:
        return [("", None)] * len(prompts)
    out = []
    for ids in prompts:
        text = served.tok.decode(ids)
        lp = None
        if body.logprobs is not None:
            lps, tops = await served.prompt_logprobs(ids, top)
            lp = completion_logprobs(served, ids, lps, [None] + tops[1:], 0)
        out.append((text, lp))
    return out


def stream_response(events: AsyncIterator[str], lease: Lease) -> StreamingResponse:
    async def body():
        try:
            async for chunk in events:
                yield chunk
        finally:
            lease.release()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _Run:
    """One request's rows on their way to the client, whole or streamed."""

    object = chunk_object = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, body, served: Served, metrics: Metrics, rows: list):
        self.body, self.served, self.metrics, self.rows = body, served, metrics, rows
        self.id = self.id_prefix + secrets.token_hex(12)
        self.created = int(time.time())
        self._head: str | None = None

    def chunk(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": self.chunk_object, "created": self.created,
                "model": self.served.name, "choices": choices, **extra}

    def sse_chunk(self, choices: list[dict]) -> str:
        """`sse(self.chunk(choices))`, with the part every chunk of this response shares
        serialised once."""
        if self._head is None:
            self._head = "data: " + json.dumps(self.chunk([]))[: -len("[]}")]
        return f"{self._head}{json.dumps(choices)}}}\n\n"

    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)

    async def stream(self) -> AsyncIterator[str]:
        generated = 0
        try:
            for first in self.openers():
                yield self.sse_chunk([first])
            # All the events of a row that are ready go out as one chunk (one delta holding
            # several tokens' text; their logprobs listed token by token), so a stream that
            # falls behind the decode loop pays its per-chunk costs once, not per token.
            async for i, events in merged_chunks(self.rows, self.metrics):
                if events is None:
                    reason, n = finished(self.rows[i], self.metrics)
                    generated += n
                    yield self.sse_chunk([self.ending(i, reason)])
                elif (d := self.delta(i, events)) is not None:
                    yield self.sse_chunk([d])
            if self.include_usage():
                yield sse(self.chunk([], usage=usage(self.prompt_total(), generated)))
        except (UserError, QueueFull) as e:
            yield sse(APIError(400, str(e)).body())
        except WorkerDied as e:
            yield sse(worker_died(e).body())
        except Exception:
            log.exception("error while streaming")
            yield sse(APIError(500, "internal server error", type="server_error").body())
        yield sse("[DONE]")

    async def whole(self) -> dict:
        async for _ in merged(self.rows, self.metrics):
            pass
        choices, generated = [], 0
        for i, req in enumerate(self.rows):
            reason, n = finished(req, self.metrics)
            generated += n
            choices.append(self.full(i, req, reason))
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.served.name, "choices": choices,
                "usage": usage(self.prompt_total(), generated)}


class CompletionRun(_Run):
    def __init__(self, body: CompletionRequest, served, metrics, rows, echoes, prompts):
        super().__init__(body, served, metrics, rows)
        self.echoes, self.prompts = echoes, prompts
        self.at: list[int] | None = None  # per choice: text offset of its next streamed token

    def prompt_of(self, i: int) -> int:
        return i // self.body.n

    def prompt_total(self) -> int:
        return sum(map(len, self.prompts))

    def choice(self, i: int, text: str, logprobs, reason: str | None) -> dict:
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": reason}

    def openers(self) -> list[dict]:
        if not self.body.echo:
            return []
        return [self.choice(i, *self.echoes[self.prompt_of(i)], None)
                for i in range(len(self.rows))]

    def delta(self, i: int, events: list[Event]) -> dict | None:
        """The chunk of choice i for these events; None when they carry nothing to send."""
        text = "".join(e.text for e in events)
        lp = None
        if self.body.logprobs is not None:
            if self.at is None:  # text offsets count from the start of the text, echo included
                self.at = [len(self.echoes[self.prompt_of(j)][0]) for j in range(len(self.rows))]
            lp = completion_logprobs(self.served, [e.token_id for e in events],
                                     [e.logprob for e in events],
                                     [e.top_logprobs or [] for e in events], self.at[i])
            self.at[i] += sum(map(len, lp["tokens"]))
        elif not text:
            return None
        return self.choice(i, text, lp, None)

    def ending(self, i: int, reason: str) -> dict:
        return self.choice(i, "", None, reason)

    def full(self, i: int, req, reason: str) -> dict:
        echo_text, echo_lp = self.echoes[self.prompt_of(i)]
        c = req.result() if req is not None else None
        text = c.text if c is not None else ""
        lp = None
        if self.body.logprobs is not None:
            tokens = c.token_ids if c is not None else []
            lps = list(c.logprobs or []) if c is not None else []
            tops = list(c.top_logprobs or [[] for _ in tokens]) if c is not None else []
            lp = completion_logprobs(self.served, tokens, lps, tops, len(echo_text))
            if echo_lp is not None:
                lp = {k: echo_lp[k] + lp[k] for k in lp}
        return self.choice(i, echo_text + text, lp, reason)


class ChatRun(_Run):
    object, chunk_object = "chat.completion", "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, body: ChatRequest, served, metrics, rows, n_prompt: int):
        super().__init__(body, served, metrics, rows)
        self.n_prompt = n_prompt

    def prompt_total(self) -> int:
        return self.n_prompt

    def openers(self) -> list[dict]:
        return [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None} for i in range(len(self.rows))]

    def delta(self, i: int, events: list[Event]) -> dict | None:
        """The chunk of choice i for these events; None when they carry nothing to send."""
        text = "".join(e.text for e in events)
        lp = None
        if self.body.logprobs:
            lp = {"content": [chat_logprob(self.served, e) for e in events]}
        elif not text:
            return None
        return {"index": i, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}

    def ending(self, i: int, reason: str) -> dict:
        return {"index": i, "delta": {}, "logprobs": None, "finish_reason": reason}

    def full(self, i: int, req, reason: str) -> dict:
        c = req.result() if req is not None else None
        lp = None
        if self.body.logprobs and c is not None:
            tops = c.top_logprobs or [[] for _ in c.token_ids]
            lp = {"content": [chat_logprob(self.served, Event(t, "", lp_, top))
                              for t, lp_, top in zip(c.token_ids, c.logprobs or [], tops)]}
        return {"index": i, "message": {"role": "assistant",
                                        "content": c.text if c is not None else ""},
                "logprobs": lp, "finish_reason": reason}


# --- the autocomplete page's question ----------------------------------------------------------
async def next_words(served: Served, body: SuggestRequest) -> list[dict]:
    """The k most likely next tokens, each continued greedily to the end of its word; a word's
    probability is the product of its tokens' (the greedy path's share of that word)."""
    ids = served.tok.encode(body.text)[-(served.block - body.max_word_tokens - 1):] or \
        [served.tok.bos_id]
    first = served.scheduler.submit(ids, SamplingParams(max_new_tokens=1, temperature=0,
                                                        logprobs=True, top_logprobs=body.k))
    events = [e async for e in first[0]]
    candidates = [(t, lp) for t, lp in events[0].top_logprobs or []
                  if served.tok.decode([t], skip_special=True)] if events else []
    params = SamplingParams(max_new_tokens=body.max_word_tokens, temperature=0, logprobs=True)
    rows = [served.scheduler.submit(ids + [t], params)[0] for t, _ in candidates]
    pieces: dict[int, list[tuple[str, float]]] = {i: [] for i in range(len(rows))}
    async for i, event in merged(rows, None):
        if event is None:
            if rows[i].result().finish_reason == "stop":
                pieces[i].append((" ", 0.0))  # the text ended: so did the word
        else:  # a special token (<|end|>, ...) ends a word as a space does
            special = not served.tok.decode([event.token_id], skip_special=True)
            pieces[i].append((" " if special else event.text, event.logprob or 0.0))
    words: dict[str, float] = {}
    for i, (t, lp) in enumerate(candidates):
        word, logp, ended = one_word([(served.piece(t), lp)] + pieces[i])
        if word.strip() and ended:  # a word longer than max_word_tokens is no suggestion
            words[word] = words.get(word, 0.0) + math.exp(logp)
    ranked = sorted(words.items(), key=lambda kv: -kv[1])[: body.k]
    return [{"text": w, "word": w.strip(), "prob": p} for w, p in ranked]


def one_word(pieces: list[tuple[str, float]]) -> tuple[str, float, bool]:
    """(text, logprob) of each token -> the first word and its logprob. The word ends at the
    first whitespace after a non-space character; a token that starts with that whitespace
    belongs to the next word, one that holds it further in still counts. The flag says
    whether the word ended within `pieces`."""
    word, logp = "", 0.0
    for piece, lp in pieces:
        cut = next((j for j, ch in enumerate(piece)
                    if ch.isspace() and (word + piece[:j]).strip()), None)
        if cut is None:
            word, logp = word + piece, logp + lp
            continue
        if cut > 0:
            word, logp = word + piece[:cut], logp + lp
        return word, logp, True
    return word, logp, False


# --- running it --------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_keys: Sequence[str], insecure: bool) -> None:
    if not is_loopback(host) and not api_keys and not insecure:
        raise UserError(f"refusing to serve on {host} without an API key: anyone who can reach "
                        f"it could use it; give --api-key KEY (or TINYLM_API_KEY), or "
                        f"--insecure if this network is trusted")


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000,
          api_keys: Sequence[str] = (), insecure: bool = False, limits: Limits | None = None,
          dtype: str | None = None, db: str | Path | None = None,
          workers: int = DEFAULT_WORKERS) -> None:
    """Serve `run` until interrupted (what `tinylm serve` calls); `db` is the feedback store
    the ranking page writes to (default: feedback.db beside the run); `workers` as in
    create_app. The decode loop gets all cores but one (`decode_threads`, in the worker
    when there is one)."""
    import uvicorn

    check_bind(host, api_keys, insecure)
    if not (Path(run) / "model.safetensors").is_file():
        raise UserError(f"{run}: not a run dir with a model (no model.safetensors)")
    threads = None if workers else decode_threads()
    app = create_app(run, api_keys, limits, dtype, db=db, workers=workers)
    worker = app.state.served.worker
    where = (f"{worker.threads} decode thread(s) in worker process {worker.process.pid}"
             if worker is not None else f"{threads} decode thread(s) in this process")
    print(f"serving {app.state.served.name} on http://{host}:{port}  (chat: /, autocomplete: "
          f"/complete, ranking: /label, API: /v1; {where})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False)
