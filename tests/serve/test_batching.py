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
