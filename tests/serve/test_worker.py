"""The decode worker (serve/worker.py): the Scheduler in a process of its own behind the
Scheduler's API. What it generates equals the in-process engine's; refusals arrive before a
response starts; a cancel reaches it; its death is an error for clients and /health, and the
server's death is its end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import httpx2 as httpx
import pytest

import tinylm
from tinylm.errors import UserError
from tinylm.infer.engine import Engine, QueueFull, SamplingParams, Scheduler
from tinylm.serve.app import create_app
from tinylm.serve.worker import DecodeWorker, WorkerDied

from .conftest import LiveServer


@pytest.fixture(scope="module")
def worker(serve_run):
    with DecodeWorker(serve_run, "fp32", max_batch=8, max_waiting=6) as w:
        yield w


@pytest.fixture(scope="module")
def engine(serve_run):
    m, tok = tinylm.load(serve_run, family="gpt")
    return Engine(m, tok, max_batch=8, dtype="fp32")


def ids_of(engine, text: str) -> list[int]:
    return engine.tok.encode(text)


def test_the_worker_generates_what_the_in_process_scheduler_does(worker, engine):
    """Greedy with logprobs, a stop string, and n > 1 with a seed (the forks' derived seeds):
    the same completions, token for token and logprob for logprob."""
    cases = [(ids_of(engine, "The cat"), SamplingParams(max_new_tokens=12, temperature=0,
                                                        logprobs=True, top_logprobs=3), 1),
             (ids_of(engine, "The dog is"), SamplingParams(max_new_tokens=20, temperature=0,
                                                           stop=["park"]), 1),
             (ids_of(engine, "A bird"), SamplingParams(max_new_tokens=10, temperature=0.9,
                                                       seed=7, ignore_eos=True), 3)]
    with Scheduler(engine, 8, 16) as local:
        for ids, params, n in cases:
            want = [r.result(60) for r in local.submit(ids, params, n)]
            got = [r.result(60) for r in worker.submit(ids, params, n)]
            assert got == want
    assert worker.running == worker.waiting == 0


def test_events_stream_in_chunks_that_add_up_to_the_completion(worker, engine):
    async def go():
        (req,) = worker.submit(ids_of(engine, "The bird"),
                               SamplingParams(max_new_tokens=16, temperature=0))
        await worker.admitted([req])
        chunks = [c async for c in req.chunks()]
        again = [e async for e in req]  # every iteration sees all events from the start
        return req, chunks, again

    req, chunks, again = asyncio.run(go())
    events = [e for c in chunks for e in c]
    c = req.result()
    assert events == again == list(req)
    assert "".join(e.text for e in events) == c.text and len(events) == len(c.token_ids) == 16
    assert req.t_submit <= req.t_first_token <= req.t_done


def test_prompt_logprobs_come_from_the_worker(worker, engine):
    ids = ids_of(engine, "The cat sat on the mat.")
    assert worker.prompt_logprobs(ids, 2) == engine.prompt_logprobs(ids, 2)
    with pytest.raises(UserError, match="top_n"):
        worker.prompt_logprobs(ids, 50)


def test_refusals_are_the_schedulers_and_come_before_any_token(worker, engine):
    with pytest.raises(UserError, match="n=9"):
        worker.submit([1, 2], SamplingParams(max_new_tokens=2), n=9)  # over max_batch
    with pytest.raises(QueueFull):
        worker.submit([1, 2], SamplingParams(max_new_tokens=2), n=7)  # over max_waiting
    # The worker judges the prompt (too long for the window): `admitted` raises it.
    reqs = worker.submit([1] * 200, SamplingParams(max_new_tokens=4))
    with pytest.raises(UserError, match="longer than the context window"):
        asyncio.run(worker.admitted(reqs))
    with pytest.raises(UserError):
        reqs[0].result(10)
    assert worker.waiting == 0


def test_a_cancel_reaches_the_worker(worker, engine):
    (req,) = worker.submit(ids_of(engine, "The"), SamplingParams(max_new_tokens=90,
                                                                 ignore_eos=True))
    next(iter(req))  # decoding
    req.cancel()
    c = req.result(30)
    assert c.finish_reason == "cancelled" and len(c.token_ids) < 90


def test_the_in_process_scheduler_is_still_there(serve_run):
    with LiveServer(create_app(serve_run, dtype="fp32", workers=0)) as s:
        served = s.app.state.served
        assert served.worker is None and isinstance(served.scheduler, Scheduler)
        body = {"model": served.name, "prompt": "The cat", "max_tokens": 12, "temperature": 0}
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200
        want = served.engine.generate(["The cat"], SamplingParams(max_new_tokens=12,
                                                                  temperature=0))[0]
        assert r.json()["choices"][0]["text"] == want.text


def test_a_dead_worker_fails_requests_in_openai_shape_and_health_says_so(serve_run):
    with LiveServer(create_app(serve_run, dtype="fp32", workers=1)) as s:
        served = s.app.state.served
        model = served.name
        with httpx.Client(base_url=s.url, timeout=60) as c:
            assert c.get("/health").json() == {"status": "ok"}
            body = {"model": model, "prompt": "The", "max_tokens": 90, "ignore_eos": True,
                    "stream": True}
            lines = []
            with c.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    lines += [line] if line else []
                    if len(lines) == 1:  # decoding: now the worker dies
                        os.kill(served.worker.process.pid, signal.SIGKILL)
            errors = [json.loads(x[6:]) for x in lines if x.startswith("data: {\"error\"")]
            assert errors and errors[0]["error"]["code"] == "worker_died"
            assert lines[-1] == "data: [DONE]"
            health = c.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "error"
            r = c.post("/v1/completions", json={**body, "stream": False})
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "worker_died"
            assert "Traceback" not in r.text
        with pytest.raises(WorkerDied):
            served.scheduler.submit([1, 2], SamplingParams(max_new_tokens=2))


def test_the_worker_exits_when_its_server_is_killed(serve_run, tmp_path):
    """SIGKILL of the server's process leaves no worker behind (it sees EOF on its pipe)."""
    script = textwrap.dedent(f"""
        import sys, time
        from tinylm.serve.worker import DecodeWorker
        w = DecodeWorker({str(serve_run)!r}, "fp32")
        print(w.process.pid, flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline:
        if not alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    pytest.fail("the worker outlived its server")


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for whoever adopted it to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_tinylm_serve_takes_workers(monkeypatch, serve_run):
    import tinylm.serve.app as app_module
    from tinylm import cli

    seen = []
    monkeypatch.setattr(app_module, "serve", lambda *a: seen.append(a[-1]))
    for flag, want in [([], app_module.DEFAULT_WORKERS), (["--workers", "1"], 1),
                       (["--workers", "0"], 0)]:
        assert cli.main(["serve", "--run", str(serve_run), *flag]) == 0
        assert seen.pop() == want
    with pytest.raises(SystemExit):
        cli.main(["serve", "--run", str(serve_run), "--workers", "2"])
