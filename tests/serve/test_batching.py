"""Many clients at once: every stream completes, and batch mates do not change a greedy text."""

from __future__ import annotations

import asyncio
import json

import httpx2 as httpx


async def stream_text(c: httpx.AsyncClient, body: dict, first_token: asyncio.Event | None = None
                      ) -> tuple[str, bool]:
    """The streamed text of one completion, and whether it ended with data: [DONE]."""
    text, done = "", False
    async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            text += json.loads(line[6:])["choices"][0]["text"]
            if first_token is not None and text:
                first_token.set()
    return text, done


def test_64_concurrent_streams_all_complete(server):
    async def go():
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            model = (await c.get("/v1/models")).json()["data"][0]["id"]
            bodies = [{"model": model, "prompt": f"The {w}", "max_tokens": 12, "seed": i,
                       "ignore_eos": True}
                      for i, w in enumerate(["cat", "dog", "bird", "fox"] * 16)]
            return bodies, await asyncio.gather(*[stream_text(c, b) for b in bodies])

    bodies, results = asyncio.run(go())
    assert len(results) == 64 and all(done for _, done in results)
    assert all(text for text, _ in results)
    assert len({t for t, _ in results}) > 4  # 64 seeds, not one text copied around


def test_a_request_joining_a_running_batch_gets_its_greedy_text_alone(server):
    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            model = (await c.get("/v1/models")).json()["data"][0]["id"]
            late = {"model": model, "prompt": "The dog is", "max_tokens": 20, "temperature": 0}
            alone, _ = await stream_text(c, late)
            started = asyncio.Event()
            long_ones = [asyncio.ensure_future(stream_text(c, {
                "model": model, "prompt": p, "max_tokens": 80, "temperature": 0.8, "seed": 3,
                "ignore_eos": True}, started)) for p in ["The cat", "A bird sat"]]
            await started.wait()  # the batch is decoding
            joined, _ = await stream_text(c, late)
            await asyncio.gather(*long_ones)
            return alone, joined

    alone, joined = asyncio.run(go())
    assert joined == alone and alone



def test_a_client_that_goes_away_cancels_its_rows(server, monkeypatch):
    scheduler = server.app.state.served.scheduler
    submitted = []
    submit = scheduler.submit

    def recording(*args, **kwargs):
        requests = submit(*args, **kwargs)
        submitted.extend(requests)
        return requests

    monkeypatch.setattr(scheduler, "submit", recording)

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            model = (await c.get("/v1/models")).json()["data"][0]["id"]
            body = {"model": model, "prompt": "The", "max_tokens": 90, "ignore_eos": True,
                    "stream": True, "n": 3}
            async with c.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                        break  # hang up after the first token

    asyncio.run(go())
    assert len(submitted) == 3
    for req in submitted:
        c = req.result(timeout=30)
        assert c.finish_reason == "cancelled" and len(c.token_ids) < 90


def test_a_stream_that_fell_behind_sends_the_ready_tokens_in_one_chunk(server):
    """Every event that is ready when the server writes goes out as one SSE chunk: one delta
    with all their text, logprobs listed token by token; the same as the whole response."""
    from tinylm.data import chat
    from tinylm.serve.app import ChatRun, sampling
    from tinylm.serve.schemas import ChatRequest

    served, metrics = server.app.state.served, server.app.state.metrics
    body = {"model": served.name, "messages": [{"role": "user", "content": "Where is the cat?"}],
            "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    request = ChatRequest(**body, stream=True, stream_options={"include_usage": True})
    ids = chat.render(served.tok, body["messages"], served.template,
                      add_generation_prompt=True).ids
    rows = served.scheduler.submit(ids, sampling(request, served, 12, True, 2, served.turn_end))
    rows[0].result(timeout=60)  # done before the stream is read: a reader far behind

    async def read() -> list[dict]:
        run = ChatRun(request, served, metrics, rows, len(ids))
        return [json.loads(c[6:]) async for c in run.stream() if c != "data: [DONE]\n\n"]

    chunks = asyncio.run(read())
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) == 1
    choice, want = content[0]["choices"][0], whole["choices"][0]
    assert choice["delta"]["content"] == want["message"]["content"]
    assert choice["logprobs"] == want["logprobs"]
    assert len(choice["logprobs"]["content"]) == chunks[-1]["usage"]["completion_tokens"] > 1
