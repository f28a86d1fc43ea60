"""The decode worker: the server's Scheduler in a process of its own, and the proxy the server
codes against.

Why a process: the scheduler's decode thread and uvicorn's event loop, in one interpreter,
take turns on one GIL, so the server tops out at about one core (py-spy: ~0.9) however many
the machine has. Here the model, the Engine, the Scheduler, detokenisation and stop strings
run in a child process (`python -m tinylm.serve.worker`, `worker_main`): spawned, a fresh
interpreter that inherits no threads or locks (as multiprocessing's `spawn`, but started as a
module, so neither a pickle nor a re-import of the caller's `__main__` is involved: a script
that calls `create_app` needs no `if __name__ == "__main__"` guard), which loads the run
itself and sets its own intra-op threads (`decode_threads`). The server's process keeps the
tokenizer (prompts, chat rendering, token pieces) and a `DecodeWorker`, which has the
Scheduler's API: `submit(ids, params, n)` -> `WorkerRequest`s with the `Request` API
(`async for`, `chunks()`, `cancel()`, `result()`), `running` / `waiting`, `close()`; and
`prompt_logprobs` (echo) is a call into the worker, so there is one copy of the model.

The wire is one socketpair, framed by multiprocessing's `Connection` (`send_bytes` /
`recv_bytes`), carrying JSON (the project never loads pickles); the child gets its end as an
inherited file descriptor. Server -> worker:

    {"op": "submit", "sid", "rids": [n request ids], "prompt": ids | text, "params", "n"}
    {"op": "cancel", "rids": [...]}
    {"op": "logprobs", "qid", "ids", "top"}
    {"op": "close"}

Worker -> server:

    {"op": "ready", "block", "vocab", "threads"} | {"op": "failed", "message"}   (at start)
    {"op": "accepted", "sid", "prompt": ids} | {"op": "rejected", "sid", "kind", "message"}
    {"op": "step", "ev": [[rid, token, text, logprob, top], ...], "done": [[rid, reason], ...]}
    {"op": "logprobs", "qid", "lps", "tops"} | {"op": "logprobs", "qid", "kind", "message"}

One "step" message per scheduler step: the worker's event loop is woken once per step by the
Scheduler (`Scheduler._deliver`), its per-request relays append to one buffer, and one
callback sends it. On the server's side one reader (`loop.add_reader` on the pipe on the
server's event loop, or a thread when there is no loop) decodes every message that is there
and wakes each event loop once for all the requests they fed.

Refusals stay synchronous where the server can judge them (a closed or dead worker, n, a full
queue: `QueueFull` from the server's own count of waiting rows, which includes rows in
transit), and the worker answers every submit with accepted / rejected, which
`DecodeWorker.admitted` awaits, so that a prompt the engine refuses is a 4xx before a stream
starts. A worker that dies ends every open request with `WorkerDied` (the server answers 503
in OpenAI's shape, a stream ends with an error event) and `problem` says so (/health); a
server that dies closes its end of the pipe, and the worker, seeing EOF, exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

from tinylm.errors import UserError
from tinylm.infer.engine import (
    Completion,
    Event,
    EventReader,
    QueueFull,
    SamplingParams,
    wake_all,
)

log = logging.getLogger("tinylm.serve.worker")
START_TIMEOUT = 600.0  # seconds for the worker to load the run (dtype "auto" measures first)


def decode_threads() -> int:
    """Give the decode loop's matmuls all CPU cores but one (unless OMP_NUM_THREADS says
    otherwise); returns the number. The event loop, which parses requests and writes every
    token to its socket, needs a core of its own: PyTorch's intra-op threads wait for each
    other at the end of every op, so when one of them shares its core with the event loop
    (or a client on the same machine), every op of a decode step waits for that core's
    time slice, and a step that takes a millisecond alone takes tens of milliseconds.
    benchmarks/serve_load.py measures it (docs/serving.md)."""
    import torch

    if not os.environ.get("OMP_NUM_THREADS"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores - 1))
    return torch.get_num_threads()


# --- the wire ----------------------------------------------------------------------------------
def params_to_wire(p: SamplingParams) -> dict:
    return dataclasses.asdict(p)  # logit_bias's int keys become strings in JSON


def params_from_wire(d: dict) -> SamplingParams:
    return SamplingParams(**{**d, "logit_bias": {int(k): v for k, v in d["logit_bias"].items()}})


def error_to_wire(e: BaseException) -> dict:
    kind = "user" if isinstance(e, UserError) else "full" if isinstance(e, QueueFull) else "bug"
    return {"kind": kind, "message": str(e)}


def error_from_wire(d: dict) -> Exception:
    """The worker's refusal as the exception the in-process Scheduler would have raised."""
    if d["kind"] == "user":
        return UserError(d["message"])
    if d["kind"] == "full":
        return QueueFull(d["message"])
    return RuntimeError(f"the decode worker failed: {d['message']}")


def _dumps(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


# --- the worker process ------------------------------------------------------------------------
def worker_main(conn: Connection, config: str) -> None:
    """The child process: load the run, then serve the pipe until it closes. `config` is JSON
    (run, dtype, max_batch, max_waiting)."""
    import tinylm
    from tinylm.infer.engine import Engine, Scheduler

    # Ctrl-C in a terminal reaches the whole process group; the server's exit (EOF on the
    # pipe) is what ends this process, after the server has finished its own shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cfg = json.loads(config)
    threads = decode_threads()
    try:
        model, tok = tinylm.load(cfg["run"], family="gpt")
        engine = Engine(model, tok, max_batch=cfg["max_batch"], dtype=cfg["dtype"])
        scheduler = Scheduler(engine, cfg["max_batch"], cfg["max_waiting"])
    except UserError as e:
        conn.send_bytes(_dumps({"op": "failed", "message": str(e)}))
        return
    except Exception as e:
        log.exception("the decode worker could not start")
        conn.send_bytes(_dumps({"op": "failed", "message": f"{type(e).__name__}: {e}"}))
        return
    conn.send_bytes(_dumps({"op": "ready", "block": engine.block_size,
                            "vocab": model.config.vocab_size, "threads": threads}))
    try:
        asyncio.run(_Relay(conn, engine, scheduler).serve())
    finally:
        scheduler.close()


class _Relay:
    """The worker's event loop: submits from the pipe into the Scheduler, and the Scheduler's
    events back, one message per step."""

    def __init__(self, conn: Connection, engine, scheduler):
        self.conn, self.engine, self.scheduler = conn, engine, scheduler
        self.requests: dict[int, object] = {}  # rid -> the Scheduler's Request
        self.events: list[list] = []  # [rid, token, text, logprob, top] since the last send
        self.done: list[list] = []  # [rid, finish_reason | {"kind", "message"}]
        self.flush_due = False
        # Prompt logprobs run beside the scheduler's thread, off this loop (as in-process).
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="logprobs")

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stopped = self.loop.create_future()
        self.loop.add_reader(self.conn.fileno(), self.on_readable)
        try:
            await self.stopped
        finally:
            self.loop.remove_reader(self.conn.fileno())
            self.pool.shutdown(wait=False, cancel_futures=True)

    def stop(self) -> None:
        if not self.stopped.done():
            self.stopped.set_result(None)

    def send(self, msg: dict) -> None:
        try:
            self.conn.send_bytes(_dumps(msg))
        except OSError:  # the server is gone
            self.stop()

    def on_readable(self) -> None:
        try:
            while self.conn.poll():
                self.handle(json.loads(self.conn.recv_bytes()))
        except (EOFError, OSError):  # the server exited (or was killed): so do we
            self.stop()

    def handle(self, msg: dict) -> None:
        op = msg["op"]
        if op == "submit":
            self.submit(msg)
        elif op == "cancel":
            for rid in msg["rids"]:
                if (req := self.requests.get(rid)) is not None:
                    req.cancel()
        elif op == "logprobs":
            asyncio.ensure_future(self.prompt_logprobs(msg))
        elif op == "close":
            self.stop()

    def submit(self, msg: dict) -> None:
        try:
            reqs = self.scheduler.submit(msg["prompt"], params_from_wire(msg["params"]),
                                         msg["n"])
        except Exception as e:  # UserError, QueueFull; anything else is reported as a bug
            self.send({"op": "rejected", "sid": msg["sid"], **error_to_wire(e)})
            return
        # Sent before any of their events, which leave through the relays' buffer.
        self.send({"op": "accepted", "sid": msg["sid"], "prompt": reqs[0].prompt_ids})
        for rid, req in zip(msg["rids"], reqs):
            self.requests[rid] = req
            asyncio.ensure_future(self.relay(rid, req))

    async def relay(self, rid: int, req) -> None:
        try:
            async for events in req.chunks():
                self.events += [[rid, e.token_id, e.text, e.logprob, e.top_logprobs]
                                for e in events]
                self.flush_soon()
            end = req.result().finish_reason
        except Exception as e:  # the engine failed (the Scheduler ends its requests with it)
            end = error_to_wire(e)
        self.requests.pop(rid, None)
        self.done.append([rid, end])
        self.flush_soon()

    def flush_soon(self) -> None:
        """Send what the relays gathered once they have all run: the Scheduler woke them in
        one callback, so this one, scheduled by the first, runs after the last."""
        if not self.flush_due:
            self.flush_due = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_due = False
        msg = {"op": "step", "ev": self.events, "done": self.done}
        self.events, self.done = [], []
        self.send(msg)

    async def prompt_logprobs(self, msg: dict) -> None:
        try:
            lps, tops = await self.loop.run_in_executor(
                self.pool, self.engine.prompt_logprobs, msg["ids"], msg["top"])
            self.send({"op": "logprobs", "qid": msg["qid"], "lps": lps, "tops": tops})
        except Exception as e:
            self.send({"op": "logprobs", "qid": msg["qid"], **error_to_wire(e)})


# --- the server's side -------------------------------------------------------------------------
class WorkerDied(Exception):
    """The decode worker process is gone: nothing can be generated until a restart."""


class WorkerRequest(EventReader):
    """One submitted continuation (one of `n`) generated by the worker: the Scheduler's
    `Request` API. Its events are kept, so every iteration sees all of them from the start;
    ending an iteration early does not cancel the request, `cancel()` does. `t_first_token`
    and `t_done` are taken when the worker's messages arrive here: what a client sees."""

    def __init__(self, worker: DecodeWorker, rid: int, index: int, prompt_ids: list[int],
                 params: SamplingParams):
        self._worker, self._rid = worker, rid
        self.index, self.prompt_ids, self.params = index, prompt_ids, params
        self.t_submit = time.perf_counter()
        self.t_first_token: float | None = None
        self.t_done: float | None = None
        self._events: list[Event] = []
        self._accepted = self._done = False
        self._reason: str | None = None
        self._error: BaseException | None = None
        self._cond = worker._cond  # one lock for all of the worker's requests
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Leave the batch at the worker's next step (finish_reason "cancelled")."""
        if not self._done:
            self._worker._send_quietly({"op": "cancel", "rids": [self._rid]})

    async def _wait(self, ready, start: int = 0):
        """Until `ready()`, read under the worker's lock, gives something true; returns it,
        with the events from `start` on, the end and the error as they were then (one
        consistent view)."""
        loop = asyncio.get_running_loop()
        while True:
            with self._worker._cond:
                if got := ready():
                    return got, self._events[start:], self._done, self._error
                wakeup = loop.create_future()
                self._async_waiters.append((loop, wakeup))
            await wakeup

    async def admitted(self) -> None:
        """Return once the worker took the request; raise what it refused it with (UserError,
        QueueFull) or WorkerDied."""
        _, _, _, error = await self._wait(lambda: self._accepted or self._done)
        if not self._accepted and error is not None:
            raise error

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end; the completion, made of the events (their texts concatenate to
        the completion's text, and every sampled token, a stop token too, has one)."""
        with self._worker._cond:
            if not self._worker._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request not done within {timeout} s")
        if self._error is not None:
            raise self._error
        ev, p = self._events, self.params
        return Completion("".join(e.text for e in ev), [e.token_id for e in ev],
                          self._reason or "length", self.prompt_ids,
                          [e.logprob for e in ev] if p.logprobs else None,
                          [e.top_logprobs for e in ev] if p.top_logprobs else None)


class DecodeWorker:
    """The Scheduler of `run`, in a decode process of its own (see the module's docstring).
    Starting waits until the worker has loaded the run: a run it cannot serve is a UserError
    here, with the worker's message."""

    def __init__(self, run: str | Path, dtype: str | None = None, max_batch: int = 64,
                 max_waiting: int = 256):
        self.max_batch, self.max_waiting = max_batch, max_waiting
        ours, theirs = socket.socketpair()  # neither end is inherited by other children
        self._conn = Connection(ours.detach())
        config = json.dumps({"run": str(run), "dtype": dtype, "max_batch": max_batch,
                             "max_waiting": max_waiting})
        package_root = str(Path(__file__).resolve().parents[2])  # where `tinylm` imports from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        # A server that exits, however (SIGKILL too), closes its end; the worker, seeing EOF,
        # exits. So the worker holds nothing of the server's (no port, no database).
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tinylm.serve.worker", str(theirs.fileno()), config],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
        theirs.close()  # the worker's now: its exit closes the pipe's last other end
        ready = self._await_ready()
        self.block_size, self.vocab_size = ready["block"], ready["vocab"]
        self.threads = ready["threads"]
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._requests: dict[int, WorkerRequest] = {}
        self._submits: dict[int, list[WorkerRequest]] = {}
        self._queries: dict[int, concurrent.futures.Future] = {}
        self._ids = itertools.count()
        self._n_waiting = self._n_running = 0
        self._closed = False
        self._dead: WorkerDied | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def _await_ready(self) -> dict:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._conn.poll(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                break
        try:
            msg = json.loads(self._conn.recv_bytes()) if self._conn.poll() else None
        except EOFError:
            msg = None
        if msg is None or msg["op"] != "ready":
            self._reap()
            self._conn.close()
            if msg is None:
                raise RuntimeError(f"the decode worker did not start (exit code "
                                   f"{self.process.returncode}; its log is this process's "
                                   "stderr)")
            raise UserError(msg["message"])
        return msg

    def _reap(self, timeout: float = 10) -> None:
        """Wait for the worker to exit; kill it when it does not in time."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    # -- the Scheduler's API --
    @property
    def running(self) -> int:
        """Rows decoding now (as far as the worker's messages have told)."""
        return self._n_running

    @property
    def waiting(self) -> int:
        """Rows submitted that have not produced a token yet (in transit included)."""
        return self._n_waiting

    @property
    def problem(self) -> str | None:
        """Why nothing can be generated (the worker died, or was closed); None when fine."""
        if self._dead is None and self.process.poll() is not None:
            self._died()
        return None if self._dead is None else str(self._dead)

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               n: int = 1) -> list[WorkerRequest]:
        """`Scheduler.submit` in the worker. The server judges what it can here (closed,
        dead, n, a full queue); the worker's verdict on the prompt arrives as accepted or
        rejected (`admitted`); a rejected request ends with that error."""
        if self._closed:
            raise UserError("the scheduler is closed")
        if self._dead is not None:
            raise self._dead
        if not 1 <= n <= self.max_batch:
            raise UserError(f"n={n} must be in 1..{self.max_batch} (the scheduler's max_batch)")
        params = params or SamplingParams()
        ids = prompt if isinstance(prompt, str) else [int(t) for t in prompt]
        with self._cond:
            if self._n_waiting + n > self.max_waiting:
                raise QueueFull(f"{self._n_waiting} requests are waiting (max_waiting="
                                f"{self.max_waiting}); try again later")
            sid, rids = next(self._ids), [next(self._ids) for _ in range(n)]
            reqs = [WorkerRequest(self, rid, i, [] if isinstance(ids, str) else ids, params)
                    for i, rid in enumerate(rids)]
            self._requests.update(zip(rids, reqs))
            self._submits[sid] = reqs
            self._n_waiting += n
        self._ensure_reader()
        self._send({"op": "submit", "sid": sid, "rids": rids, "prompt": ids,
                    "params": params_to_wire(params), "n": n})
        return reqs

    async def admitted(self, requests: Sequence[WorkerRequest | None]) -> None:
        """Wait for the worker's verdict on these requests; raise a refusal (UserError,
        QueueFull) or WorkerDied."""
        for r in requests:
            if r is not None:
                await r.admitted()

    def prompt_logprobs(self, ids: Sequence[int], top_n: int = 0
                        ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """`Engine.prompt_logprobs` in the worker, blocking (call it off the event loop, or
        use `aprompt_logprobs`)."""
        return self._query(ids, top_n).result()

    async def aprompt_logprobs(self, ids: Sequence[int], top_n: int = 0
                               ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        return await asyncio.wrap_future(self._query(ids, top_n))

    def _query(self, ids: Sequence[int], top_n: int) -> concurrent.futures.Future:
        if self._dead is not None:
            raise self._dead
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            qid = next(self._ids)
            self._queries[qid] = future
        self._ensure_reader()
        self._send({"op": "logprobs", "qid": qid, "ids": [int(i) for i in ids], "top": top_n})
        return future

    def close(self) -> None:
        """Stop the worker; requests still waiting or running end as "cancelled"."""
        if self._closed:
            return
        self._closed = True
        self._stop_reading()
        self._send_quietly({"op": "close"})
        self._reap()
        self._conn.close()
        self._end_all(None)

    def __enter__(self) -> DecodeWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- reading the pipe --
    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the worker's messages on `loop` (the server's event loop): no thread, and
        the readers on that loop are woken without a cross-thread hop. Call it on `loop`
        before the first submit; without it, the first submit starts a reader thread."""
        with self._cond:
            if self._loop is None and self._thread is None and not self._closed:
                self._loop = loop
                loop.add_reader(self._conn.fileno(), self._on_readable)

    def _ensure_reader(self) -> None:
        with self._cond:
            if self._loop is None and self._thread is None:
                self._thread = threading.Thread(target=self._read_forever, daemon=True,
                                                name="tinylm-worker-reader")
                self._thread.start()

    def _stop_reading(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            loop.remove_reader(self._conn.fileno())
        else:
            loop.call_soon_threadsafe(loop.remove_reader, self._conn.fileno())

    def _on_readable(self) -> None:
        try:
            messages = [self._conn.recv_bytes()]
            while self._conn.poll():
                messages.append(self._conn.recv_bytes())
        except (EOFError, OSError):
            if self._loop is not None:
                self._loop.remove_reader(self._conn.fileno())
                self._loop = None
            self._died()
            return
        self._deliver(messages)

    def _read_forever(self) -> None:
        while not self._closed:
            try:
                messages = [self._conn.recv_bytes()]
                while self._conn.poll():
                    messages.append(self._conn.recv_bytes())
            except (EOFError, OSError):
                if not self._closed:
                    self._died()
                return
            self._deliver(messages)

    def _deliver(self, messages: list[bytes]) -> None:
        """Apply a batch of the worker's messages, then wake each event loop once."""
        now, touched, answers = time.perf_counter(), {}, []
        with self._cond:
            for raw in messages:
                msg = json.loads(raw)
                op = msg["op"]
                if op == "step":
                    self._step(msg, now, touched)
                elif op == "accepted":
                    for r in self._submits.pop(msg["sid"], ()):
                        r._accepted, r.prompt_ids = True, msg["prompt"]
                        touched[id(r)] = r
                elif op == "rejected":
                    error = error_from_wire(msg)
                    for r in self._submits.pop(msg["sid"], ()):
                        self._end(r, None, error, now, touched)
                elif op == "logprobs":
                    answers.append((self._queries.pop(msg["qid"], None), msg))
            self._cond.notify_all()
            waiters = [w for r in touched.values() for w in r._async_waiters]
            for r in touched.values():
                r._async_waiters = []
        wake_all(waiters)
        for future, msg in answers:
            if future is None:
                continue
            if "lps" in msg:
                future.set_result((msg["lps"], [[tuple(a) for a in alts]
                                                for alts in msg["tops"]]))
            else:
                future.set_exception(error_from_wire(msg))

    def _step(self, msg: dict, now: float, touched: dict) -> None:
        for rid, token, text, logprob, top in msg["ev"]:
            r = self._requests.get(rid)
            if r is None:  # ended here already (closed)
                continue
            if r.t_first_token is None:
                r.t_first_token = now
                self._n_waiting -= 1
                self._n_running += 1
            r._events.append(Event(token, text, logprob,
                                   None if top is None else [tuple(a) for a in top]))
            touched[id(r)] = r
        for rid, end in msg["done"]:
            r = self._requests.get(rid)
            if r is not None:
                self._end(r, *((end, None) if isinstance(end, str) else
                               (None, error_from_wire(end))), now, touched)

    def _end(self, r: WorkerRequest, reason: str | None, error: BaseException | None,
             now: float, touched: dict) -> None:
        """(Under the lock.) The request is over: finished, refused or failed."""
        if r._done:
            return
        if r.t_first_token is None:
            self._n_waiting -= 1
        else:
            self._n_running -= 1
        r._done, r._reason, r._error, r.t_done = True, reason, error, now
        self._requests.pop(r._rid, None)
        touched[id(r)] = r

    # -- the end --
    def _died(self) -> None:
        if self._dead is not None or self._closed:
            return
        try:
            code = self.process.wait(1)
        except subprocess.TimeoutExpired:
            code = None
        self._dead = WorkerDied(f"the decode worker exited (exit code {code}); restart the "
                                "server" if code is not None else
                                "the decode worker stopped answering; restart the server")
        log.error("%s", self._dead)
        self._end_all(self._dead)

    def _end_all(self, error: WorkerDied | None) -> None:
        """End every open request (cancelled, or failed with `error`) and query."""
        now, touched = time.perf_counter(), {}
        with self._cond:
            for r in list(self._requests.values()):
                self._end(r, "cancelled" if error is None else None, error, now, touched)
            self._submits.clear()
            queries, self._queries = list(self._queries.values()), {}
            self._cond.notify_all()
            waiters = [w for r in touched.values() for w in r._async_waiters]
        wake_all(waiters)
        for q in queries:
            q.set_exception(error or WorkerDied("the decode worker was closed"))

    def _send(self, msg: dict) -> None:
        data = _dumps(msg)
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except OSError:
            self._died()
            raise self._dead or WorkerDied("the decode worker was closed") from None

    def _send_quietly(self, msg: dict) -> None:
        try:
            self._send(msg)
        except (WorkerDied, OSError):
            pass


if __name__ == "__main__":  # the worker process: python -m tinylm.serve.worker FD CONFIG
    worker_main(Connection(int(sys.argv[1])), sys.argv[2])
