"""Continuous batching: rows join and leave a running batch at any step, and every row's
tokens are still those it would get alone (the naive reference's, when greedy)."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

from tinylm.errors import UserError
from tinylm.infer.engine import (
    Engine,
    Event,
    QueueFull,
    Request,
    SamplingParams,
    Scheduler,
    _Batch,
    _Row,
    _Slots,
    naive_generate,
)
from tinylm.infer.fast import FastGPT
from tinylm.models.gpt import GPT, GPTConfig
from tinylm.models.layers import KVCache
from tinylm.tokenizer import SPECIAL_TOKENS, train_char

TEXT = "the cat sat on the mat. a dog ran to the sun. héllo wörld\n" * 3
PROMPTS = ["the cat", "a", "héllo wörld and a dog ran to the sun", "dog ran to", "t",
           "sun. the mat", "the cat sat on the mat. a dog ran", "wör"]
GREEDY = SamplingParams(max_new_tokens=20, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def tok():
    return train_char(TEXT)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32,
                    mlp="swiglu", zero_init=False)
    model = GPT(cfg).eval()
    with torch.no_grad():  # bigger weights than GPT's init, so the outputs are not near-uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8)
    return model


def naive(model, tok, prompt: str, params: SamplingParams) -> list[int]:
    ids = naive_generate(model, torch.tensor([tok.encode(prompt)]), params)[0].tolist()
    return ids[len(tok.encode(prompt)):]


def readable(tok, **kw) -> SamplingParams:
    """Greedy-able params that ban byte-fallback and special tokens: the text is characters."""
    ban = [tok.special_id(f"<0x{b:02X}>") for b in range(256)]
    ban += [tok.special_id(t) for t in SPECIAL_TOKENS]
    return SamplingParams(logit_bias=dict.fromkeys(ban, -100.0), ignore_eos=True, **kw)


def drive(engine: Engine, arrivals: dict[int, list[tuple[str, SamplingParams]]],
          max_batch: int = 64) -> tuple[dict[str, _Row], list[int]]:
    """Run the step machinery by hand: at step s, the prompts of arrivals[s] join. Returns
    each prompt's row and the batch size at each step."""
    batch, rows, sizes, step = _Batch(engine, max_batch), {}, [], 0
    while batch.busy or any(s >= step for s in arrivals):
        for prompt, params in arrivals.get(step, []):
            rows[prompt] = engine._rows([prompt], params)[0]
            batch.add([rows[prompt]])
        batch.step()
        sizes.append(len(batch.rows))
        step += 1
    return rows, sizes


# --- the cache's row operations ----------------------------------------------------------------
class FakeNet:
    """Just what _Slots asks of a FastGPT: caches of one layout."""

    def __init__(self, key_block: int):
        self.key_block = key_block

    def new_cache(self, batch: int, max_len: int, pad=None) -> KVCache:
        return KVCache(2, batch, 3, 4, max_len, torch.float32, "cpu", pad, self.key_block)


def prefilled(net: FakeNet, prompts: list[torch.Tensor], T: int) -> KVCache:
    """A prefill's cache holding per-row keys/values (n_layer, H, L, D), right-aligned."""
    cache = net.new_cache(len(prompts), T)
    for layer in range(2):
        k = torch.zeros(len(prompts), 3, T, 4)
        for i, p in enumerate(prompts):
            k[i, :, T - p.shape[2]:] = p[layer]
        cache.append(layer, k, -k)
    cache.advance(T)
    return cache


@pytest.mark.parametrize("key_block", [0, 4])
def test_cache_rows_keep_their_keys_through_joins_shifts_growth_and_drops(key_block):
    """Random keys per row, spliced in at different times and lengths (one longer than the
    batch so far: everyone shifts right), rows dropped, everyone compacted left: each row's
    keys and values stay its own, ending at the shared position."""
    torch.manual_seed(0)
    net, slots = FakeNet(key_block), _Slots(FakeNet(key_block), max_batch=8)
    rows: list[torch.Tensor] = []  # each row's keys so far (n_layer, H, len, D)

    def join(lengths):
        new = [torch.randn(2, 3, n, 4) for n in lengths]
        T = slots.align(max(lengths))
        slots.splice(prefilled(net, new, T), list(range(len(new))), lengths)
        rows.extend(new)

    def decode_step():
        view = slots.view(room=8)
        token = torch.randn(len(rows), 2, 3, 1, 4)
        for layer in range(2):
            view.append(layer, token[:, layer], -token[:, layer])
        slots.advanced()
        for i in range(len(rows)):
            rows[i] = torch.cat([rows[i], token[i]], dim=2)

    def check():
        view = slots.view(room=8)
        for layer in range(2):
            keys = view.keys(layer, slots.pos)  # (n, H, pos, D)
            values = view.v_layers[layer][:, :, : slots.pos]
            for i, r in enumerate(rows):
                assert slots.pos - slots.pads[i] == r.shape[2]
                torch.testing.assert_close(keys[i, :, slots.pads[i]:], r[layer], rtol=0, atol=0)
                torch.testing.assert_close(values[i, :, slots.pads[i]:], -r[layer])

    join([3, 5])
    check()
    for _ in range(3):
        decode_step()
    join([2])  # shorter than the batch: left-padded to its position
    check()
    join([17, 1, 1])  # longer: every row moves right
    check()
    for _ in range(20):  # past the storage's first length: it grows
        decode_step()
    check()
    for i in (3, 0):  # the longest row (no padding) and another leave
        slots.drop(i)
        rows[i] = rows[-1]
        rows.pop()
    before, unit = slots.pos, max(key_block, 1)
    common = min(slots.pads) // unit * unit  # padding every row has on its left
    assert common > 0
    slots.compact()
    assert slots.pos == before - common and min(slots.pads) < unit
    check()
    decode_step()
    check()


# --- the step machinery, driven by hand ----------------------------------------------------------
def test_rows_joining_at_different_steps_match_the_naive_reference(model, tok):
    """Joins at steps 0, 3, 7 and 12 with prompts shorter and longer than the running rows, and
    rows leaving at different steps (different max_new_tokens): every row greedy as alone."""
    p = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (20, 9, 14)]
    arrivals = {0: [(PROMPTS[0], p[0]), (PROMPTS[1], p[1])],
                3: [(PROMPTS[2], p[2])],  # longer than anything running: the batch shifts
                7: [(PROMPTS[3], p[0]), (PROMPTS[4], p[1])],
                12: [(PROMPTS[6], p[0])],
                25: [(PROMPTS[7], p[2])]}  # after most have left
    rows, sizes = drive(Engine(model, tok), arrivals)
    assert max(sizes) >= 4 and sizes[-1] == 0
    for prompt, params in [x for group in arrivals.values() for x in group]:
        assert rows[prompt].tokens == naive(model, tok, prompt, params), prompt
        assert rows[prompt].finish == "length"


def test_joining_rows_on_the_c_kernels_cache_match_their_lone_runs(model, tok):
    """bf16 weights: keys in blocks and the C decode kernel where it builds. Reference: the
    same engine with each prompt alone."""
    engine = Engine(model, tok, dtype="bf16")
    arrivals = {0: [(PROMPTS[0], GREEDY)], 2: [(PROMPTS[2], GREEDY), (PROMPTS[1], GREEDY)],
                5: [(PROMPTS[5], GREEDY)], 23: [(PROMPTS[6], GREEDY)]}
    rows, _ = drive(engine, arrivals)
    for prompt, params in [x for group in arrivals.values() for x in group]:
        assert rows[prompt].tokens == engine.generate([prompt], params)[0].token_ids, prompt


def test_seeded_samples_are_the_same_alone_or_joining_a_batch(model, tok):
    engine = Engine(model, tok)
    p = [SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=s, ignore_eos=True)
         for s in (1, 2, 3)]
    arrivals = {0: [(PROMPTS[0], p[0])], 4: [(PROMPTS[3], p[1]), (PROMPTS[2], GREEDY)],
                9: [(PROMPTS[5], p[2])]}
    rows, _ = drive(engine, arrivals)
    for prompt, params in [x for group in arrivals.values() for x in group]:
        assert rows[prompt].tokens == engine.generate([prompt], params)[0].token_ids
    ref = naive_generate(model, torch.tensor([tok.encode(PROMPTS[0])]), p[0])[0].tolist()
    assert rows[PROMPTS[0]].tokens == ref[len(tok.encode(PROMPTS[0])):]


def test_penalties_follow_rows_that_join_and_leave(model, tok):
    pen = SamplingParams(max_new_tokens=15, temperature=0, ignore_eos=True,
                         repetition_penalty=1.5, frequency_penalty=0.7, presence_penalty=0.3)
    short = SamplingParams(max_new_tokens=4, temperature=0, ignore_eos=True)
    arrivals = {0: [(PROMPTS[0], pen), (PROMPTS[1], short)], 6: [(PROMPTS[3], pen)]}
    rows, _ = drive(Engine(model, tok), arrivals)
    for prompt, params in [x for group in arrivals.values() for x in group]:
        assert rows[prompt].tokens == naive(model, tok, prompt, params)


def test_generate_batches_more_prompts_than_rows_continuously(model, tok):
    """max_batch=3 with 8 prompts: each finished row's place goes to the next prompt."""
    params = [SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)
              for n in (12, 3, 7, 5, 9, 2, 11, 6)]
    out = Engine(model, tok, max_batch=3).generate(PROMPTS, params)
    for prompt, p, c in zip(PROMPTS, params, out):
        assert c.token_ids == naive(model, tok, prompt, p)


def test_n_prefills_the_prompt_once_and_forks_the_cache(model, tok, monkeypatch):
    prefills = []
    real = FastGPT.hidden_states

    def counting(self, idx, cache):
        if cache.pos == 0:
            prefills.append(tuple(idx.shape))
        return real(self, idx, cache)

    monkeypatch.setattr(FastGPT, "hidden_states", counting)
    sampled = SamplingParams(max_new_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
    with Scheduler(Engine(model, tok)) as s:
        greedy = [r.result(timeout=30) for r in s.submit(PROMPTS[2], GREEDY, n=3)]
        samples = [r.result(timeout=30) for r in s.submit(PROMPTS[2], sampled, n=3)]
        alone = s.submit(PROMPTS[2], sampled)[0].result(timeout=30)
    assert prefills[:2] == [(1, len(tok.encode(PROMPTS[2])))] * 2  # one row for n=3
    ref = naive(model, tok, PROMPTS[2], GREEDY)
    assert all(c.token_ids == ref for c in greedy)
    assert samples[0].token_ids == alone.token_ids  # request 0 draws as alone with the seed
    assert len({tuple(c.token_ids) for c in samples}) == 3  # the others from derived seeds


# --- the scheduler, live -------------------------------------------------------------------------
def test_concurrent_clients_joining_at_random_times_get_their_lone_greedy_text(model, tok):
    engine = Engine(model, tok)
    results: dict[int, list[int]] = {}
    with Scheduler(engine, max_batch=5) as s:

        def client(i: int) -> None:
            time.sleep(random.Random(i).uniform(0, 0.05))
            p = SamplingParams(max_new_tokens=10 + i, temperature=0, ignore_eos=True)
            results[i] = s.submit(PROMPTS[i % 8], p)[0].result(timeout=60).token_ids

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert s.running == 0 and s.waiting == 0
    for i, ids in results.items():
        p = SamplingParams(max_new_tokens=10 + i, temperature=0, ignore_eos=True)
        assert ids == naive(model, tok, PROMPTS[i % 8], p)
    assert len(results) == 12


def test_scheduler_results_equal_generate_with_stop_strings_and_logprobs(model, tok):
    engine = Engine(model, tok)
    text = engine.generate([PROMPTS[0]], readable(tok, max_new_tokens=20, temperature=0))[0].text
    stop = text[5:7]  # a stop string the greedy text does contain
    params = readable(tok, max_new_tokens=20, temperature=0, stop=[stop], logprobs=True,
                      top_logprobs=3)
    want = engine.generate(PROMPTS[:3], params)
    with Scheduler(engine) as s:
        reqs = [s.submit(prompt, params)[0] for prompt in PROMPTS[:3]]
        events = [list(r) for r in reqs]
        got = [r.result() for r in reqs]
    assert got[0].finish_reason == "stop" and stop not in got[0].text
    for w, g, evs in zip(want, got, events):
        assert (g.text, g.token_ids, g.finish_reason) == (w.text, w.token_ids, w.finish_reason)
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-5)
        assert [[t for t, _ in step] for step in g.top_logprobs] == [
            [t for t, _ in step] for step in w.top_logprobs]
        assert "".join(e.text for e in evs) == g.text
        assert [e.token_id for e in evs] == g.token_ids
        assert [e.logprob for e in evs] == g.logprobs
        assert all(isinstance(e, Event) and len(e.top_logprobs) == 3 for e in evs)


def test_async_clients_stream_without_a_thread_each(model, tok):
    engine = Engine(model, tok)
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)

    async def client(s: Scheduler, prompt: str) -> tuple[str, list[int]]:
        req = s.submit(prompt, p)[0]
        events = [e async for e in req]
        return "".join(e.text for e in events), [e.token_id for e in events]

    async def main(s: Scheduler):
        return await asyncio.gather(*(client(s, q) for q in PROMPTS[:4]))

    with Scheduler(engine) as s:
        threads = threading.active_count()
        out = asyncio.run(main(s))
        assert threading.active_count() == threads
    want = engine.generate(PROMPTS[:4], p)
    assert out == [(c.text, c.token_ids) for c in want]


def test_chunks_hand_a_late_reader_every_ready_event_at_once(model, tok):
    engine = Engine(model, tok)
    p = SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=True)

    async def read(req):
        return [chunk async for chunk in req.chunks()]

    with Scheduler(engine) as s:
        req = s.submit(PROMPTS[0], p)[0]
        want = req.result(timeout=30)  # every event is in before the reader starts
        chunks = asyncio.run(read(req))
    assert len(chunks) == 1 and [e.token_id for e in chunks[0]] == want.token_ids
    assert "".join(e.text for e in chunks[0]) == want.text
    assert [e.logprob for e in chunks[0]] == want.logprobs


def test_tokens_reach_the_client_before_the_decode_that_follows_them(model, tok, monkeypatch):
    """A step's tokens (a newcomer's first above all) are handed over before the decode of the
    next ones starts, which they do not need."""
    engine = Engine(model, tok)
    order: list[str] = []
    decode = FastGPT.decode
    monkeypatch.setattr(FastGPT, "decode",
                        lambda self, *a: order.append("decode") or decode(self, *a))
    push = Request._push

    def recorded(self, events, **kw):
        order.extend(["token"] * len(events))
        return push(self, events, **kw)

    monkeypatch.setattr(Request, "_push", recorded)
    p = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    with Scheduler(engine) as s:
        req = s.submit(PROMPTS[0], p)[0]
        assert req.result(timeout=30).token_ids == naive(model, tok, PROMPTS[0], p)
    # the prompt's prefill runs through hidden_states, not decode: then token, decode, ...
    assert order == ["token", "decode", "token", "decode", "token"]


def test_a_cancelled_request_leaves_and_the_others_are_unchanged(model, tok):
    long = SamplingParams(max_new_tokens=50, temperature=0, ignore_eos=True)
    with Scheduler(Engine(model, tok)) as s:
        a, b = s.submit(PROMPTS[0], long)[0], s.submit(PROMPTS[1], long)[0]
        for i, _ in enumerate(a):
            if i == 2:
                a.cancel()
                break
        ca, cb = a.result(timeout=30), b.result(timeout=30)
        assert s.running == 0
        waiting = s.submit(PROMPTS[3], long)[0]
        waiting.cancel()  # before or after it joined: it ends either way
        assert waiting.result(timeout=30).finish_reason == "cancelled"
    assert ca.finish_reason == "cancelled" and 3 <= len(ca.token_ids) < 50
    assert ca.token_ids == naive(model, tok, PROMPTS[0], long)[: len(ca.token_ids)]
    assert cb.finish_reason == "length" and cb.token_ids == naive(model, tok, PROMPTS[1], long)


class Gate:
    """Holds the scheduler's thread inside its next step until opened."""

    def __init__(self, engine: Engine):
        self.open, self.entered, real = threading.Event(), threading.Event(), engine.net

        def net():
            self.entered.set()
            self.open.wait(30)
            return real()

        engine.net = net


def test_the_waiting_queue_is_bounded(model, tok):
    engine = Engine(model, tok)
    gate = Gate(engine)
    with Scheduler(engine, max_batch=2, max_waiting=3) as s:
        first = s.submit(PROMPTS[0], GREEDY)
        gate.entered.wait(30)  # the thread holds `first`, inside a step, not yet admitted
        queued = s.submit(PROMPTS[1], GREEDY, n=2)
        assert s.waiting == 3
        with pytest.raises(QueueFull, match="max_waiting=3"):
            s.submit(PROMPTS[3], GREEDY)
        gate.open.set()
        done = [r.result(timeout=30) for r in first + queued]
        assert s.waiting == 0
        s.submit(PROMPTS[3], GREEDY)[0].result(timeout=30)  # room again
    assert [c.token_ids for c in done[1:]] == [naive(model, tok, PROMPTS[1], GREEDY)] * 2


def test_bad_requests_fail_at_submit(model, tok):
    with Scheduler(Engine(model, tok), max_batch=4) as s:
        with pytest.raises(UserError, match="longer than the context window"):
            s.submit(TEXT, GREEDY)
        with pytest.raises(UserError, match="n=5 must be in 1..4"):
            s.submit("a", GREEDY, n=5)
        with pytest.raises(UserError, match="outside the vocabulary"):
            s.submit("a", SamplingParams(max_new_tokens=5, logit_bias={10**6: 1.0}))
        assert s.waiting == 0
        assert s.submit("a", SamplingParams(max_new_tokens=0))[0].result(timeout=30).token_ids == []


def test_an_error_inside_a_step_reaches_the_clients_instead_of_hanging(model, tok):
    engine = Engine(model, tok)
    with Scheduler(engine) as s:
        real, engine.net = engine.net, lambda: 1 / 0
        req = s.submit("a", GREEDY)[0]
        with pytest.raises(ZeroDivisionError):
            req.result(timeout=30)
        with pytest.raises(ZeroDivisionError):
            list(req)
        engine.net = real  # the thread survives: later requests run
        assert s.submit("a", GREEDY)[0].result(timeout=30).token_ids == naive(model, tok, "a",
                                                                              GREEDY)


def test_close_ends_running_and_waiting_requests_as_cancelled(model, tok):
    engine = Engine(model, tok)
    gate = Gate(engine)
    s = Scheduler(engine, max_batch=1)
    running, waiting = s.submit(PROMPTS[0], GREEDY) + s.submit(PROMPTS[1], GREEDY)
    gate.entered.wait(30)  # inside the first step
    closer = threading.Thread(target=s.close)
    closer.start()
    while not s._closed:
        time.sleep(0.001)
    gate.open.set()  # the step ends; the thread sees the scheduler closed
    closer.join(30)
    assert running.result(timeout=1).finish_reason == "cancelled"
    assert len(running.result().token_ids) == 1  # the one step it was given
    assert waiting.result(timeout=1).finish_reason == "cancelled"
    assert waiting.result().token_ids == []
    with pytest.raises(UserError, match="closed"):
        s.submit("a", GREEDY)


# --- prompt logprobs -----------------------------------------------------------------------------
def test_prompt_logprobs_are_the_models_next_token_distribution(model, tok):
    ids = tok.encode(PROMPTS[6])
    lp, top = Engine(model, tok).prompt_logprobs(ids, top_n=3)
    with torch.no_grad():
        ref = model(torch.tensor([ids]))[0].log_softmax(-1)  # (T, V)
    assert lp[0] is None and top[0] == []
    assert lp[1:] == pytest.approx([ref[t - 1, ids[t]].item() for t in range(1, len(ids))],
                                   abs=1e-5)
    for t in range(1, len(ids)):
        assert [i for i, _ in top[t]] == ref[t - 1].topk(3).indices.tolist()
    with pytest.raises(UserError, match="longer than the context window"):
        Engine(model, tok).prompt_logprobs(tok.encode(TEXT))
