"""Limits and security: bad input is a 4xx in OpenAI's shape, never a 5xx or a stack trace."""

from __future__ import annotations

import asyncio
import json

import httpx2 as httpx
import pytest

from tinylm.serve.app import check_bind

CHAT = {"messages": [{"role": "user", "content": "Where is the cat?"}]}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        c.model = c.get("/v1/models").json()["data"][0]["id"]
        yield c


def is_openai_error(r) -> dict:
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    return body


BAD = [  # (path, body or raw text, status)
    ("/v1/completions", "{not json", 400),
    ("/v1/completions", "[1, 2]", 400),
    ("/v1/completions", {"prompt": "x"}, 400),  # no model
    ("/v1/completions", {"prompt": 5}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**9}, 400),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**40}, 400),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400),
    ("/v1/completions", {"prompt": "x", "stop": ""}, 400),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"999999": 1}}, 400),
    ("/v1/completions", {"prompt": [999999]}, 400),
    ("/v1/completions", {"prompt": [-1]}, 400),
    ("/v1/completions", {"prompt": "x", "bogus_field": 1}, 400),
    ("/v1/completions", {"prompt": "x", "model": "no-such-model"}, 404),
    ("/v1/chat/completions", {"messages": []}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400),
    ("/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, 400),  # needs logprobs
    ("/v1/chat/completions", {**CHAT, "max_tokens": -5}, 400),
]


@pytest.mark.parametrize("path,body,status", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_a_4xx_in_openai_shape(http, path, body, status):
    if isinstance(body, dict) and body != {"prompt": "x"} and "model" not in body:
        body = {"model": http.model, **body}
    content = body if isinstance(body, str) else json.dumps(body)
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    is_openai_error(r)


def test_an_over_long_prompt_is_context_length_exceeded(http):
    r = http.post("/v1/completions", json={"model": http.model, "prompt": "cat " * 200})
    assert r.status_code == 400
    assert is_openai_error(r)["code"] == "context_length_exceeded"
    r = http.post("/v1/chat/completions", json={
        "model": http.model, "messages": [{"role": "user", "content": "a b"}], "max_tokens": 95})
    assert r.status_code == 400 and is_openai_error(r)["code"] == "context_length_exceeded"


def test_an_over_large_body_is_413_with_or_without_a_length(make_server):
    s = make_server(max_body_bytes=2000)
    body = json.dumps({"model": "x", "prompt": "a" * 5000}).encode()
    with httpx.Client(base_url=s.url) as c:
        r = c.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413 and is_openai_error(r)
        chunks = (body[i : i + 500] for i in range(0, len(body), 500))  # chunked: no length
        r = c.post("/v1/completions", content=chunks,
                   headers={"content-type": "application/json"})
        assert r.status_code == 413 and is_openai_error(r)


def test_a_key_is_needed_everywhere_but_health(make_server):
    s = make_server(api_keys=["sesame"])
    with httpx.Client(base_url=s.url) as c:
        assert c.get("/health").status_code == 200
        for path in ["/v1/models", "/metrics", "/", "/complete", "/static/chat.js",
                     "/openapi.json"]:
            r = c.get(path)
            assert r.status_code == 401, path
            assert is_openai_error(r)["code"] == "invalid_api_key"
        assert c.get("/", headers={"authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/").headers["www-authenticate"].startswith("Basic")  # browsers ask
        ok = {"authorization": "Bearer sesame"}
        assert c.get("/v1/models", headers=ok).status_code == 200
        assert c.get("/", auth=("anyone", "sesame")).status_code == 200  # Basic, for pages
        r = c.post("/v1/completions", headers=ok, json={"model": s.url and c.get(
            "/v1/models", headers=ok).json()["data"][0]["id"], "prompt": "The", "max_tokens": 2})
        assert r.status_code == 200


def test_more_concurrent_requests_than_a_key_may_have_get_429(make_server):
    s = make_server(per_key_concurrency=2)

    async def go():
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            model = (await c.get("/v1/models")).json()["data"][0]["id"]
            body = {"model": model, "prompt": "The", "max_tokens": 60, "ignore_eos": True}
            return await asyncio.gather(*[c.post("/v1/completions", json=body)
                                          for _ in range(6)])

    codes = sorted(r.status_code for r in asyncio.run(go()))
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes


def test_a_full_queue_is_503_with_retry_after(make_server):
    s = make_server(max_waiting=0)  # a queue with no room: every request finds it full
    with httpx.Client(base_url=s.url, timeout=60) as c:
        model = c.get("/v1/models").json()["data"][0]["id"]
        r = c.post("/v1/completions", json={"model": model, "prompt": "The", "max_tokens": 4})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert is_openai_error(r)["code"] == "queue_full"


def test_static_paths_cannot_leave_their_folder(http):
    assert http.get("/static/chat.js").status_code == 200
    for path in ["/static/../app.py", "/static/%2e%2e/app.py", "/static/..%2fapp.py",
                 "/static/%2e%2e%2f%2e%2e%2fcli.py", "/static//etc/passwd",
                 "/static/..%5capp.py", "/static/style.css%00.py"]:
        r = http.get(path)
        assert r.status_code == 404, path
        assert "import" not in r.text


def test_a_bug_is_a_500_without_a_trace(make_server, monkeypatch):
    s = make_server()
    import tinylm.serve.app as app_module

    def broken(*a, **k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app_module, "prompt_ids", broken)
    with httpx.Client(base_url=s.url) as c:
        r = c.post("/v1/completions", json={"model": c.get("/v1/models").json()["data"][0]["id"],
                                            "prompt": "x"})
    assert r.status_code == 500 and "secret" not in r.text
    assert is_openai_error(r)["type"] == "server_error"


def test_a_public_bind_needs_a_key_or_insecure():
    check_bind("127.0.0.1", [], False)
    check_bind("::1", [], False)
    check_bind("0.0.0.0", ["k"], False)
    check_bind("0.0.0.0", [], True)
    with pytest.raises(Exception, match="--api-key"):
        check_bind("0.0.0.0", [], False)


def test_serve_refuses_a_public_bind_without_a_key(serve_run, error_of, capsys):
    err = error_of(["serve", "--run", str(serve_run), "--host", "0.0.0.0"], capsys)
    assert "--insecure" in err


def test_metrics_show_latencies_and_queue_sizes(http):
    http.post("/v1/completions", json={"model": http.model, "prompt": "The", "max_tokens": 5})
    text = http.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples["tinylm_requests_running"] == 0 and samples["tinylm_requests_waiting"] == 0
    assert samples["tinylm_time_to_first_token_seconds_count"] >= 1
    assert samples["tinylm_inter_token_latency_seconds_count"] >= 4
    assert samples['tinylm_time_to_first_token_seconds_bucket{le="+Inf"}'] == \
        samples["tinylm_time_to_first_token_seconds_count"]
    assert "# TYPE tinylm_inter_token_latency_seconds histogram" in text
