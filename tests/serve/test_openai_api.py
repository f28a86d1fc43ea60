"""The official openai client against a live server: what an OpenAI user would do."""

from __future__ import annotations

import math

import openai
import pytest

import tinylm
from tinylm.data import chat
from tinylm.infer.engine import Engine, SamplingParams

QUESTION = [{"role": "user", "content": "Where is the cat?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def engine(serve_run):
    m, tok = tinylm.load(serve_run, family="gpt")
    return Engine(m, tok, dtype="fp32")


def test_models_lists_the_run(client, serve_run):
    (card,) = client.models.list().data
    assert card.id == serve_run.name and card.owned_by == "tinylm"


def test_completion_equals_the_engine(client, model, engine):
    r = client.completions.create(model=model, prompt="The cat", max_tokens=12, temperature=0)
    want = engine.generate(["The cat"], SamplingParams(max_new_tokens=12, temperature=0))[0]
    assert r.choices[0].text == want.text
    assert r.usage.prompt_tokens == len(engine.tok.encode("The cat"))
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_answers_in_the_chat_format(client, model):
    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0)
    assert r.choices[0].message.content.startswith("The cat is in the")
    assert r.choices[0].finish_reason == "stop"  # at the template's <|end|>, not the cap


def test_streamed_chat_equals_the_whole_answer(client, model):
    whole = client.chat.completions.create(model=model, messages=QUESTION, temperature=0)
    stream = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert any(c.choices and c.choices[0].delta.content for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_long_stream_arrives_in_pieces_while_it_is_decoded(client, model):
    """Tokens reach the client while later ones are still being decoded. (An event carries
    every token ready when the server writes: the tiny model's short chat reply can be ready
    whole before the first write on a fast CPU, so this asks for 80 tokens.)"""
    chunks = list(client.completions.create(model=model, prompt="The dog", max_tokens=80,
                                            temperature=0, stream=True))
    pieces = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(pieces) > 3, pieces


def test_streamed_completion_ends_with_finish_reason(client, model):
    chunks = list(client.completions.create(model=model, prompt="The dog", max_tokens=8,
                                            temperature=0, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    text = "".join(c.choices[0].text for c in chunks)
    whole = client.completions.create(model=model, prompt="The dog", max_tokens=8,
                                      temperature=0)
    assert text == whole.choices[0].text


def test_stop_string_ends_the_text_before_it(client, model):
    free = client.chat.completions.create(model=model, messages=QUESTION, temperature=0)
    stopped = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                             stop=[" in"])
    full = free.choices[0].message.content
    assert stopped.choices[0].message.content == full[: full.index(" in")]
    assert stopped.choices[0].finish_reason == "stop"


def test_n_choices_differ_and_a_seed_reproduces_them(client, model):
    kw = dict(model=model, prompt="The", max_tokens=16, temperature=1.0, n=4, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    texts = [c.text for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert texts == [c.text for c in b.choices]
    assert len(set(texts)) > 1
    other = client.completions.create(**{**kw, "seed": 8})
    assert [c.text for c in other.choices] != texts


def test_chat_logprobs_are_the_models(client, model, engine, serve_run):
    r = client.chat.completions.create(model=model, messages=QUESTION, temperature=0,
                                       max_tokens=6, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    ids = chat.render(engine.tok, QUESTION, chat.TEMPLATE, add_generation_prompt=True).ids
    want = engine.generate([ids], SamplingParams(max_new_tokens=6, temperature=0,
                                                 logprobs=True))[0]
    for got, lp in zip(content, want.logprobs):
        assert got.logprob == pytest.approx(lp, abs=1e-4)
        assert len(got.top_logprobs) == 3
        assert got.top_logprobs[0].logprob == pytest.approx(got.logprob, abs=1e-5)  # greedy
    assert sum(math.exp(t.logprob) for t in content[0].top_logprobs) <= 1 + 1e-5


def test_echo_with_logprobs_scores_token_id_prompts(client, model, engine):
    """What lm-evaluation-harness's local-completions sends for log-likelihood tasks."""
    ids = [engine.tok.encode("The cat sat on the mat."), engine.tok.encode("The dog")]
    r = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0,
                                  logprobs=1, echo=True)
    assert len(r.choices) == 2
    for prompt, choice in zip(ids, r.choices):
        want, tops = engine.prompt_logprobs(prompt, 1)
        got = choice.logprobs.token_logprobs
        assert got[0] is None and len(got) == len(prompt) + 1
        assert got[1 : len(prompt)] == pytest.approx(want[1:], abs=1e-4)
        assert choice.text.startswith(engine.tok.decode(prompt))
        assert list(choice.logprobs.top_logprobs[1].values())[0] == pytest.approx(
            tops[1][0][1], abs=1e-4)


def test_max_tokens_zero_with_echo_returns_the_prompt_only(client, model):
    r = client.completions.create(model=model, prompt="The cat", max_tokens=0, echo=True,
                                  logprobs=0)
    assert r.choices[0].text == "The cat" and r.usage.completion_tokens == 0
