"""Text generation: the one engine behind sampling, chat, the server, PPO rollouts and labeling.

Everything runs on one step machinery (`_Batch`) with continuous batching: requests join a
running batch at any step and leave it the step they finish. A newcomer's prompt is prefilled
on its own (each distinct prompt once: `n > 1` forks the cache) and its keys and values are
spliced into a free row of the running `KVCache`, left-padded so that it ends where every row's
next token goes; the cache's `pad` counts keep the padding out of attention and start each
row's positions at 0, so a row's tokens do not depend on its batch mates or on when it joined
(`_Slots` holds the row operations: splice, shift, compact, drop). Then each *decode* step feeds
only the newest token of every row.

- `Engine.generate` / `stream` / `stream_batch` drive a private batch from the caller's thread
  (more prompts than `max_batch`: each finished row's place goes to the next prompt);
- `Scheduler` drives one from a background thread for concurrent clients (the server): submit,
  then iterate a `Request`'s `Event`s (blocking or asyncio), cancel, or wait for its result;
  a bounded waiting queue raises `QueueFull`.

`naive_generate` runs the whole model over the whole sequence at every step: slow, obviously
correct, and kept as the reference the engine is tested against token for token. Both share the
numerics of sampling (`apply_penalties`, `sampling_probs`, `sample_from`), so they can only
differ in how the logits were computed.

Logprobs are those of the model's own distribution (softmax of the raw logits, before
penalties, temperature and top-k/top-p), as PPO needs and as vLLM reports by default.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tinylm.errors import UserError
from tinylm.infer.fast import FastGPT, check_supported, resolve_dtype
from tinylm.models.gpt import GPT
from tinylm.models.layers import KVCache


@dataclass
class SamplingParams:
    """How to continue one prompt. Defaults give plain sampling at temperature 1."""

    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # per request: the same seed gives the same text in any batch
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output (CTRL)
    frequency_penalty: float = 0.0  # minus this x (times the token was generated) (OpenAI)
    presence_penalty: float = 0.0  # minus this once a token was generated at all (OpenAI)
    stop: list[str] = field(default_factory=list)  # stop strings; not part of the output text
    stop_token_ids: list[int] = field(default_factory=list)  # besides EOS
    ignore_eos: bool = False  # keep going past the tokenizer's <|eos|>
    logprobs: bool = False  # return the logprob of every generated token
    top_logprobs: int = 0  # ... and this many most likely alternatives at each step
    truncate: bool = False  # prompt too long for the window: keep its end instead of failing
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} must be in (0, 1]"),
            (self.top_k >= 0, f"top_k={self.top_k} must be >= 0 (0 = off)"),
            (self.max_new_tokens >= 0, f"max_new_tokens={self.max_new_tokens} must be >= 0"),
            (self.repetition_penalty > 0,
             f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)"),
            (math.isfinite(self.frequency_penalty) and math.isfinite(self.presence_penalty),
             "frequency_penalty and presence_penalty must be finite numbers"),
            (0 <= self.top_logprobs <= 20, f"top_logprobs={self.top_logprobs} must be in 0..20"),
            (all(self.stop), "stop strings must not be empty"),
            (all(math.isfinite(b) for b in self.logit_bias.values()),
             "logit_bias values must be finite numbers (-100 bans a token, 100 forces it)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    @classmethod
    def from_dict(cls, data: dict) -> SamplingParams:
        """From JSON-like input (server requests, config files); unknown fields are errors."""
        from tinylm.config import build

        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            raise UserError(f"unknown sampling field {unknown[0]!r}; valid: {', '.join(names)}")
        data = dict(data)
        if isinstance(data.get("stop"), str):
            data["stop"] = [data["stop"]]
        return build(cls, data, prefix="sampling.")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return (self.repetition_penalty != 1 or self.frequency_penalty != 0
                or self.presence_penalty != 0)


@dataclass
class Completion:
    """One finished request. `token_ids` holds every sampled token, including a stop token or
    the tokens that spelled a stop string; `text` ends before either."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string) | "length" (max_new_tokens) | "cancelled"
    prompt_ids: list[int]
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None  # per step: (token id, logprob)


# --- sampling numerics, shared by the engine and the naive reference ---------------------------
def apply_penalties(logits: torch.Tensor, seen: torch.Tensor, counts: torch.Tensor,
                    repetition: torch.Tensor | float, frequency: torch.Tensor | float,
                    presence: torch.Tensor | float) -> torch.Tensor:
    """logits (B, V); seen (B, V) bool: token in prompt or output; counts (B, V): times each
    token was generated. Penalties are floats or (B, 1) tensors.

    Repetition (Keskar et al. 2019, as HF applies it): divide a seen token's positive logit by the
    penalty, multiply a negative one. Frequency/presence (OpenAI): subtract freq x count and
    presence x [count > 0] from the output tokens' logits."""
    scaled = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, scaled, logits)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def bias_rows(params: Sequence[SamplingParams], V: int, device) -> torch.Tensor | None:
    """(B, V) logit biases of a batch of requests, or None when none has any."""
    if not any(p.logit_bias for p in params):
        return None
    bias = torch.zeros(len(params), V, device=device)
    for i, p in enumerate(params):
        if p.logit_bias:
            bias[i, list(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()), device=device)
    return bias


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor | float,
                   top_k: torch.Tensor | int, top_p: torch.Tensor | float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on (B, V) logits; returns (B, V)
    probabilities, zero outside the kept tokens (not renormalised: sampling does not need it).

    Each setting is a number or a per-row tensor ((B, 1) for temperature and top_p, (B,) for
    top_k; 0 = off). Tokens tied with the last kept one are kept too. Sorting a 4096-word
    vocabulary costs milliseconds on a CPU, so the nucleus is looked for among the 64 most
    likely tokens first, then the 512, and the whole vocabulary is sorted only when needed."""
    B, V = logits.shape
    neg_inf = torch.tensor(float("-inf"), device=logits.device)
    if not (isinstance(temperature, float) and temperature == 1.0):  # x / 1 is x: skip a pass
        temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
        logits = logits / temperature.clamp(min=1e-8).reshape(-1, 1)
    top_k = torch.as_tensor(top_k, device=logits.device).expand(B)
    if bool((top_k > 0).any()):
        k = torch.where(top_k > 0, top_k, 1).clamp(max=V)  # (B,)
        kth = torch.topk(logits, int(k.max())).values.gather(-1, (k - 1)[:, None])  # (B, 1)
        kth = torch.where(top_k[:, None] > 0, kth, neg_inf)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)  # (B, V), renormalised over the top-k
    top_p = torch.as_tensor(top_p, dtype=probs.dtype, device=probs.device).reshape(-1, 1)
    if bool((top_p < 1).any()):
        top_p = top_p.expand(B, 1)
        for m in sorted({min(64, V), min(512, V), V}):
            best = torch.topk(probs, m).values  # (B, m), descending
            cum = best.cumsum(-1)
            if m == V or bool((cum[:, -1:] >= top_p).all()):  # every nucleus is inside
                break
        n_keep = ((cum - best) < top_p).sum(-1, keepdim=True).clamp(min=1)  # (B, 1)
        threshold = torch.where(top_p < 1, best.gather(-1, n_keep - 1), 0.0)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids (B,) by inverse transform sampling: the first token whose cumulative
    probability exceeds u * total, with u (B,) uniform in [0, 1). One random number per row
    (cheap, and easy to draw from each request's own generator)."""
    cdf = probs.cumsum(-1)  # (B, V)
    target = u[:, None].to(cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=probs.size(-1) - 1)


def pick(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from last-position logits (B, V), all rows with the same settings."""
    if p.greedy:
        return logits.argmax(-1)
    probs = sampling_probs(logits.float(), p.temperature, p.top_k, p.top_p)
    u = torch.rand(logits.size(0), generator=gen)  # on the CPU, like the engine's generators
    return sample_from(probs, u.to(logits.device))


@torch.no_grad()
def naive_generate(model, idx: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, T) prompt ids -> (B, T + max_new_tokens); the full forward pass at every step.

    No stopping, no padding: the reference for the engine's token choices."""
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    block, T = model.config.block_size, idx.shape[1]
    for _ in range(p.max_new_tokens):
        logits = model(idx[:, -block:])[:, -1]
        bias = bias_rows([p], logits.size(-1), logits.device)
        if bias is not None:
            logits = logits + bias
        if p.penalized:
            V = logits.size(-1)
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)
            counts = torch.stack([torch.bincount(row[T:], minlength=V) for row in idx]).float()
            logits = apply_penalties(logits, seen, counts, p.repetition_penalty,
                                     p.frequency_penalty, p.presence_penalty)
        idx = torch.cat([idx, pick(logits, p, gen)[:, None]], dim=1)
    return idx


# --- the engine ---------------------------------------------------------------------------------
class _Row:
    """The bookkeeping of one request while it runs: tokens, text, stop-string matching."""

    def __init__(self, index: int, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 tok):
        self.index, self.prompt, self.params = index, prompt, params
        self.stop_ids, self.tok = stop_ids, tok
        self.gen = None
        if params.seed is not None:
            self.gen = torch.Generator().manual_seed(params.seed)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.finish: str | None = None
        # Text is always built from the same increments a stream yields, so a streamed and a
        # plain completion agree even where the model emits broken UTF-8 byte tokens.
        self.incremental = tok is not None
        self.text = ""  # emitted so far
        self.pending = ""  # held back: might be the start of a stop string
        self.prefix_off = self.read_off = 0
        self.n_text_tokens = 0  # tokens that count for the text (a stop token does not)
        self.cancelled = False  # set from another thread; the batch drops the row next step

    def fork(self, index: int) -> _Row:
        """Another continuation of the same prompt (n > 1). With a seed, its generator starts
        from a seed derived from (seed, index), so the n samples differ but are reproducible."""
        p = self.params
        if p.seed is not None:
            p = dataclasses.replace(p, seed=(p.seed * 1_000_003 + index) % 2**63)
        return _Row(index, self.prompt, p, self.stop_ids, self.tok)

    def event(self, delta: str) -> Event:
        """The Event of the token just added, which released `delta`."""
        lp = self.logprobs[-1] if self.params.logprobs else None
        top = self.top[-1] if self.params.top_logprobs else None
        return Event(self.tokens[-1], delta, lp, top)

    def add(self, token: int) -> str:
        """Take one sampled token; returns the newly valid text (maybe empty)."""
        self.tokens.append(token)
        if token in self.stop_ids:
            self.finish = "stop"
            return self._flush()
        self.n_text_tokens += 1
        delta = self._stop_check(self._detok()) if self.incremental else ""
        if self.finish is None and len(self.tokens) >= self.params.max_new_tokens:
            self.finish = "length"
            delta += self._flush()
        return delta

    def _detok(self, final: bool = False) -> str:
        """New text since the last call, once it is whole UTF-8 (or whatever is left, when
        `final`). Decoding a short window that starts a few tokens back (as TGI does) keeps this
        cheap and handles decoders that strip a leading space from the first token."""
        ids = self.tokens[: self.n_text_tokens]
        before = self.tok.decode(ids[self.prefix_off : self.read_off], skip_special=True)
        now = self.tok.decode(ids[self.prefix_off :], skip_special=True)
        if final or (len(now) > len(before) and not now.endswith("\ufffd")):
            self.prefix_off, self.read_off = (len(ids) if final else self.read_off), len(ids)
            return now[len(before) :]
        return ""

    def _stop_check(self, delta: str) -> str:
        """Emit what can no longer become part of a stop string; cut at the first stop string.
        A stop string may span several tokens, so the tail that could still grow into one is
        held back in `pending` (it is always entirely inside pending + delta)."""
        buf = self.pending + delta
        stops = self.params.stop
        if not stops:
            self.text += buf
            self.pending = ""
            return buf
        hits = [i for i in (buf.find(s) for s in stops) if i >= 0]
        if hits:
            self.finish = "stop"
            out, self.pending = buf[: min(hits)], ""
            self.text += out
            return out
        hold = 0
        for k in range(min(len(buf), max(map(len, stops)) - 1), 0, -1):
            if any(s.startswith(buf[-k:]) for s in stops):
                hold = k
                break
        out, self.pending = buf[: len(buf) - hold], buf[len(buf) - hold :]
        self.text += out
        return out

    def _flush(self) -> str:
        """At the end: whatever text is still held back (incomplete UTF-8, a partial stop)."""
        if not self.incremental:
            return ""
        out = self._stop_check(self._detok(final=True))
        rest, self.pending = self.pending, ""
        self.text += rest
        return out + rest

    def completion(self) -> Completion:
        return Completion(self.text, list(self.tokens), self.finish or "length", self.prompt,
                          self.logprobs if self.params.logprobs else None,
                          self.top if self.params.top_logprobs else None)


class _Settings:
    """Per-row sampling settings as tensors, so one step samples the whole batch at once.
    Made again whenever rows join or leave (cheap next to a decode step)."""

    def __init__(self, rows: list[_Row], V: int, device: torch.device):
        ps = [r.params for r in rows]
        self.any_sampled = any(not p.greedy for p in ps)
        self.all_sampled = not any(p.greedy for p in ps)  # then no argmax is needed
        self.penalized = any(p.penalized for p in ps)
        self.want_logprobs = any(p.logprobs or p.top_logprobs for p in ps)
        self.top_n = max(p.top_logprobs for p in ps)

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        self.greedy = col([p.greedy for p in ps], torch.bool)
        # A float where every row samples at 1 (PPO's rollouts): sampling_probs skips dividing.
        self.temperature = (1.0 if all(p.temperature == 1.0 for p in ps)
                            else col([p.temperature for p in ps])[:, None])
        self.top_k = col([p.top_k for p in ps], torch.long)
        self.top_p = col([p.top_p for p in ps])[:, None]
        self.bias = bias_rows(ps, V, device)
        if self.penalized:
            self.repetition = col([p.repetition_penalty for p in ps])[:, None]
            self.frequency = col([p.frequency_penalty for p in ps])[:, None]
            self.presence = col([p.presence_penalty for p in ps])[:, None]
            # Rebuilt whenever rows join or leave, from what each row has seen so far.
            self.seen = torch.zeros(len(rows), V, dtype=torch.bool, device=device)
            self.counts = torch.zeros(len(rows), V, device=device)
            for i, r in enumerate(rows):
                self.seen[i, r.prompt + r.tokens] = True
                if r.tokens:
                    self.counts[i] = torch.bincount(torch.tensor(r.tokens), minlength=V).to(
                        self.counts)

    def choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Next token ids (B,) from logits (B, V) under each row's settings."""
        if self.bias is not None:
            logits = logits + self.bias
        if self.penalized:
            logits = apply_penalties(logits, self.seen, self.counts, self.repetition,
                                     self.frequency, self.presence)
        nxt = None if self.all_sampled else logits.argmax(-1)
        if self.any_sampled:
            probs = sampling_probs(logits, self.temperature, self.top_k, self.top_p)
            # One uniform per row: from the row's own generator when it has a seed (so its
            # text does not depend on its batch mates), else from the global RNG.
            u = torch.rand(len(rows), device=logits.device)
            own = [(i, torch.rand(1, generator=r.gen).item()) for i, r in enumerate(rows)
                   if r.gen is not None]
            if own:  # one write, not one per row
                at, vals = zip(*own)
                u[list(at)] = torch.tensor(vals, dtype=u.dtype, device=u.device)
            drawn = sample_from(probs, u)
            nxt = drawn if nxt is None else torch.where(self.greedy, nxt, drawn)
        if self.penalized:
            self.seen.scatter_(1, nxt[:, None], True)
            self.counts.scatter_add_(1, nxt[:, None], torch.ones_like(nxt[:, None],
                                                                       dtype=self.counts.dtype))
        return nxt


class TextStream:
    """An iterator of one completion's text increments (Engine.stream)."""

    def __init__(self, row: _Row, deltas: Iterator[str]):
        self._row, self._deltas = row, deltas

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._deltas)

    def close(self) -> None:
        """Stop generating (what was produced stays in `completion`)."""
        self._deltas.close()

    @property
    def completion(self) -> Completion:
        return self._row.completion()


class Engine:
    """Batched generation with a KV cache. `model` is a GPT, run through its `FastGPT` twin
    (a config FastGPT does not implement is a UserError here); `tokenizer` is needed for text
    prompts and output. `max_batch`: the most rows `generate` decodes together. The model's
    train/eval mode is left alone: FastGPT has no dropout, and a Scheduler's thread must not
    flip the mode of a model that another thread trains."""

    def __init__(self, model: GPT, tokenizer=None, max_batch: int = 64,
                 dtype: str | torch.dtype | None = None):
        check_supported(model)  # a refused model fails here, not at its first request
        self.model, self.tok, self.max_batch = model, tokenizer, max_batch
        self.block_size = model.config.block_size
        # Weights for generation: None = the model's own (exact); "auto" = the fastest measured
        # lossless here; or fp32, bf16, fp16, int8 (infer/fast.py).
        self.dtype = resolve_dtype(dtype, model)
        self._fast: FastGPT | None = None
        self._fast_key: tuple | None = None
        self._probe: tuple | None = None  # (layout, strided views, segment ids): _weights_key

    def net(self) -> FastGPT:
        """What runs the forward passes: the model's `FastGPT` twin, rebuilt whenever the
        model's weights changed since, so generation always sees the current weights.

        A change shows in a tensor's version counter (loads, in-place ops) or, since fused
        optimizer steps leave that counter alone (PyTorch 2.13's fused AdamW), in a sum over
        an even sample of about 64 of its values, which any optimizer step moves."""
        key = self._weights_key()
        if key != self._fast_key:
            self._fast, self._fast_key = FastGPT(self.model, self.dtype), key
        return self._fast

    def _weights_key(self) -> tuple:
        """What changes when the weights do (`net()`): each tensor's identity, storage and
        version counter, and the sum of an even sample of about 64 of its values. The samples
        are views kept from call to call and summed in one cat + index_add, not three small
        ops per tensor: this runs whenever a request finds the batch empty, so before every
        request's first token when clients come one at a time."""
        params = list(self.model.parameters())
        layout = tuple((id(p), p.data_ptr(), p.shape, p.is_contiguous()) for p in params)
        with torch.no_grad():
            if self._probe is None or self._probe[0] != layout:
                views = [p.detach().view(-1)[:: max(1, p.numel() // 64)] if p.is_contiguous()
                         else None for p in params]  # a non-contiguous one: sampled anew
                self._probe = (layout, views, None)
            _, views, seg = self._probe
            sample = [v if v is not None else p.reshape(-1)[:: max(1, p.numel() // 64)]
                      for v, p in zip(views, params)]
            if seg is None:
                seg = torch.repeat_interleave(
                    torch.arange(len(sample)), torch.tensor([len(v) for v in sample]))
                seg = seg.to(sample[0].device) if sample else seg
                self._probe = (layout, views, seg)
            sums = [] if not sample else torch.zeros(len(sample), dtype=torch.float64,
                                                      device=seg.device).index_add_(
                0, seg, torch.cat(sample).double()).tolist()  # (n params,)
        return layout, tuple(p._version for p in params), tuple(sums)

    # -- public API --
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Continue every prompt; results come back in the order of `prompts`."""
        rows = self._rows(prompts, params)
        for _ in self._run(rows):
            pass
        return [r.completion() for r in rows]

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None
               ) -> TextStream:
        """Text increments of one completion as soon as they are valid UTF-8 (and cannot be
        the start of a stop string); joined they equal `generate(...)[0].text`. Bad input
        raises here, before the first increment is asked for. The stream's `completion`
        holds the token ids (and logprobs, if asked for) of what it has produced so far."""
        self._need_tokenizer("streaming text")
        rows = self._rows([prompt], params)
        return TextStream(rows[0], (delta for _, delta in self._run(rows) if delta))

    def stream_batch(self, prompts, params=None) -> Iterator[tuple[int, str]]:
        """(prompt index, text increment) pairs for a batch of prompts run together."""
        self._need_tokenizer("streaming text")
        rows = self._rows(prompts, params)  # validate now, not at the first next()
        return ((row.index, delta) for row, delta in self._run(rows) if delta)

    def prompt_logprobs(self, ids: Sequence[int], top_n: int = 0
                        ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """The logprob of every token of `ids` given the ones before it (the first has none:
        None), and the `top_n` most likely tokens at each position (the first: []). What an
        echoed completion with logprobs reports, and what log-likelihood evaluations
        (lm-evaluation-harness) score. One forward pass over the whole sequence."""
        ids = [int(i) for i in ids]
        V = self.model.config.vocab_size
        if not ids:
            raise UserError("prompt_logprobs needs at least one token")
        if len(ids) > self.block_size:
            raise UserError(f"the sequence is {len(ids)} tokens, longer than the context window "
                            f"(block_size={self.block_size}); shorten it")
        if not all(0 <= i < V for i in ids):
            raise UserError(f"token ids must be in 0..{V - 1}")
        if not 0 <= top_n <= 20:
            raise UserError(f"top_n={top_n} must be in 0..20")
        net = self.net()
        with torch.inference_mode():
            idx = torch.tensor([ids], device=net.device)  # (1, T)
            cache = net.new_cache(1, len(ids))
            logp = net.decode(idx, cache)[0, :-1].float().log_softmax(-1)  # (T-1, V)
            chosen = logp.gather(-1, idx[0, 1:, None])[:, 0].tolist()
            top = torch.topk(logp, top_n) if top_n else None
        alternatives: list[list[tuple[int, float]]] = [[]]
        for t in range(len(ids) - 1):
            alternatives.append([] if top is None else list(
                zip(top.indices[t].tolist(), top.values[t].tolist())))
        return [None, *chosen], alternatives

    # -- requests --
    def _need_tokenizer(self, what: str) -> None:
        if self.tok is None:
            raise UserError(f"the Engine has no tokenizer, which {what} needs; make it with "
                            "Engine(model, tokenizer)")

    def _rows(self, prompts, params) -> list[_Row]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            raise UserError("prompts must be a list of prompts, e.g. ['Once upon a time']")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise UserError(f"{len(params)} sampling params for {len(prompts)} prompts; "
                            "give one, or one per prompt")
        rows = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            ids = self._prompt_ids(prompt, p)
            bad = [t for t in p.logit_bias if not 0 <= t < self.model.config.vocab_size]
            if bad:
                raise UserError(f"logit_bias names token id {bad[0]}, outside the vocabulary "
                                f"(0..{self.model.config.vocab_size - 1})")
            stop_ids = set(p.stop_token_ids)
            if self.tok is not None and not p.ignore_eos:
                stop_ids.add(self.tok.eos_id)
            if p.stop:
                self._need_tokenizer("stop strings")
            rows.append(_Row(i, ids, p, stop_ids, self.tok))
        return rows

    def _prompt_ids(self, prompt, p: SamplingParams) -> list[int]:
        if isinstance(prompt, str):
            self._need_tokenizer("a text prompt")
            ids = self.tok.encode(prompt)
        else:
            ids = [int(i) for i in prompt]
        if not ids:
            self._need_tokenizer("an empty prompt")
            ids = [self.tok.bos_id]  # nothing to condition on: start as a document would
        block, n = self.block_size, p.max_new_tokens
        if n >= block:
            raise UserError(f"max_new_tokens={n} is beyond the context window "
                            f"(block_size={block}); use at most {block - 1}")
        if len(ids) + n > block:
            if p.truncate:
                return ids[len(ids) + n - block :]
            if len(ids) > block:
                raise UserError(f"the prompt is {len(ids)} tokens, longer than the context "
                                f"window (block_size={block}); shorten it or ask for truncation")
            raise UserError(f"prompt ({len(ids)} tokens) + max_new_tokens={n} exceeds the "
                            f"context window (block_size={block}); lower max_new_tokens to "
                            f"{block - len(ids)} or shorten the prompt")
        return ids

    # -- the loop --
    def _run(self, rows: list[_Row]) -> Iterator[tuple[_Row, str]]:
        """(row, text increment) for every token of `rows`, on the same step machinery as the
        Scheduler's (a private `_Batch`, driven from this thread)."""
        batch = _Batch(self, self.max_batch)
        for r in rows:
            batch.add([r])
        while batch.busy:
            events, _ = batch.sample()
            yield from events  # before the decode: a stream's reader sees its token at once
            batch.forward()

    @staticmethod
    def _record_logprobs(logits, nxt, rows: list[_Row], top_n: int) -> None:
        logp = logits.float().log_softmax(-1)  # (B, V): the model's own distribution
        chosen = logp.gather(-1, nxt[:, None])[:, 0].tolist()
        top = torch.topk(logp, top_n) if top_n else None
        for i, r in enumerate(rows):
            if r.finish is not None:
                continue
            r.logprobs.append(chosen[i])
            if r.params.top_logprobs:
                n = r.params.top_logprobs
                r.top.append(list(zip(top.indices[i, :n].tolist(), top.values[i, :n].tolist())))


# --- the scheduler: continuous batching behind the server ---------------------------------------
class QueueFull(Exception):
    """The scheduler's bounded waiting queue is full: try again later (the server answers 503)."""


@dataclass
class Event:
    """One step of one request: the token it sampled and the text that token released ("" while
    the bytes of a character or a possible stop string are held back). The texts of all events
    of a request concatenate to its `Completion.text`."""

    token_id: int
    text: str
    logprob: float | None = None  # when params.logprobs
    top_logprobs: list[tuple[int, float]] | None = None  # when params.top_logprobs > 0


def _wake(futures: list[asyncio.Future]) -> None:
    for f in futures:
        if not f.done():
            f.set_result(None)


def wake_all(waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]) -> None:
    """Resolve asyncio readers' futures: those of the loop running here at once, those of
    other loops (the scheduler's thread has none) with one call_soon_threadsafe per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future]] = {}
    for loop, future in waiters:
        by_loop.setdefault(loop, []).append(future)
    try:
        here = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    for loop, futures in by_loop.items():
        if loop is here:
            _wake(futures)
            continue
        try:
            loop.call_soon_threadsafe(_wake, futures)
        except RuntimeError:  # that loop is closed: nobody is waiting any more
            pass


class EventReader:
    """The client's side of a request's events, shared by `Request` and the decode worker's
    proxy of it (serve/worker.py): the events are kept, so each iteration (`for e in req`
    blocking, `async for e in req` on an event loop, or `async for events in req.chunks()`)
    sees all of them from the start. The filler appends to `_events`, sets `_done` / `_error`
    under `_cond`, notifies it and wakes the futures in `_async_waiters` (`wake_all`)."""

    _cond: threading.Condition
    _events: list[Event]
    _done: bool
    _error: BaseException | None
    _async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]

    def __iter__(self) -> Iterator[Event]:
        i = 0
        while True:
            with self._cond:
                while len(self._events) <= i and not self._done:
                    self._cond.wait()
                chunk, done, error = self._events[i:], self._done, self._error
            i += len(chunk)
            yield from chunk
            if done and i >= len(self._events):
                if error is not None:
                    raise error
                return

    async def chunks(self) -> AsyncIterator[list[Event]]:
        """The events in lists: each list holds every event that arrived since the last one
        was taken (at least one). A reader that falls behind the decode loop thus catches up
        in one go (the server sends such a list as one SSE chunk) instead of paying its
        per-event costs for every token."""
        loop = asyncio.get_running_loop()
        i = 0
        while True:
            with self._cond:
                chunk, done, error = self._events[i:], self._done, self._error
                if not chunk and not done:
                    wakeup = loop.create_future()
                    self._async_waiters.append((loop, wakeup))
            if chunk:
                i += len(chunk)
                yield chunk
            elif done:
                if error is not None:
                    raise error
                return
            else:
                await wakeup

    async def _aiter(self) -> AsyncIterator[Event]:
        async for chunk in self.chunks():
            for e in chunk:
                yield e

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._aiter()


class Request(EventReader):
    """One submitted continuation (one of `n`), filled by the scheduler's thread.

    Its events are kept, so each iteration (`for e in req` blocking, `async for e in req` on
    an event loop, without a thread per request, or `async for events in req.chunks()`: the
    same in lists of whatever has arrived) sees all of them from the start. Ending an
    iteration early does not cancel the request; `cancel()` does."""

    def __init__(self, row: _Row, scheduler: Scheduler):
        self._row, self._scheduler = row, scheduler
        self.index, self.prompt_ids, self.params = row.index, row.prompt, row.params
        self.t_submit = time.perf_counter()
        self.t_first_token: float | None = None
        self.t_done: float | None = None
        self._events: list[Event] = []
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    # -- the scheduler's side --
    def _push(self, events: list[Event], done: bool = False, error: BaseException | None = None,
              wake: bool = True) -> list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]:
        """Add events (and the end); wakes the waiting readers, or with `wake=False` returns
        the asyncio ones for the caller to wake together with others (`wake_all`)."""
        now = time.perf_counter()
        with self._cond:
            if events and self.t_first_token is None:
                self.t_first_token = now
            self._events.extend(events)
            if done or error is not None:
                self._done, self._error, self.t_done = True, error, now
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        if wake:
            wake_all(waiters)
        return waiters

    # -- the client's side --
    @property
    def done(self) -> bool:
        return self._done

    def cancel(self) -> None:
        """Leave the batch at the next step (finish_reason "cancelled")."""
        self._row.cancelled = True
        self._scheduler._wake()

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end; the completion (finish_reason "stop", "length" or "cancelled").
        TimeoutError if it is not done within `timeout` seconds."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request not done within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._row.completion()


class Scheduler:
    """Continuous batching over one Engine, in one background thread: a request submitted
    while others decode joins the running batch at the next step; a finished or cancelled
    one leaves at once. At most `max_batch` rows decode together; at most `max_waiting`
    requests wait for a row (more raise QueueFull)."""

    def __init__(self, engine: Engine, max_batch: int = 64, max_waiting: int = 256):
        self.engine, self.max_batch, self.max_waiting = engine, max_batch, max_waiting
        self._batch = _Batch(engine, max_batch)
        self._inbox: list[list[_Row]] = []
        self._requests: dict[int, Request] = {}  # id(row) -> its request
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="tinylm-scheduler", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        """Rows decoding now."""
        return len(self._batch.rows)

    @property
    def waiting(self) -> int:
        """Requests submitted, not yet prefilled."""
        return sum(map(len, self._inbox)) + self._batch.n_waiting

    def submit(self, prompt: str | Sequence[int], params: SamplingParams | None = None,
               n: int = 1) -> list[Request]:
        """Queue `n` continuations of one prompt (prefilled once, the cache forked). Bad
        input raises UserError here; a full queue raises QueueFull. With a `seed`, request 0
        draws as a lone request with that seed would, the others from seeds derived from it."""
        if self._closed:
            raise UserError("the scheduler is closed")
        if not 1 <= n <= self.max_batch:
            raise UserError(f"n={n} must be in 1..{self.max_batch} (the scheduler's max_batch)")
        params = params or SamplingParams()
        row0 = self.engine._rows([prompt], params)[0]
        rows = [row0] + [row0.fork(i) for i in range(1, n)]
        requests = [Request(r, self) for r in rows]
        with self._cond:
            if self.waiting + n > self.max_waiting:
                raise QueueFull(f"{self.waiting} requests are waiting (max_waiting="
                                f"{self.max_waiting}); try again later")
            for r, req in zip(rows, requests):
                self._requests[id(r)] = req
            self._inbox.append(rows)
            self._cond.notify_all()
        return requests

    def close(self) -> None:
        """Stop the thread; requests still waiting or running end as "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._inbox or self._batch.busy):
                    self._cond.wait()
                if self._closed:
                    break
                inbox, self._inbox = self._inbox, []
            for group in inbox:
                self._batch.add(group)
            try:
                events, finished = self._batch.sample()
                # The tokens go out before the decode, which their clients do not need.
                self._deliver(events, finished)
                self._batch.forward()
            except Exception as e:  # a bug must not hang the clients: fail what was running
                self._batch.reset()
                self._fail(e)
        rows = self._batch.reset() + [r for g in self._inbox for r in g]
        for r in rows:
            r.finish = r.finish or "cancelled"
        self._deliver([], rows)

    def _deliver(self, events: list[tuple[_Row, str]], finished: list[_Row]) -> None:
        """Hand a step's events to their requests. Waiting asyncio readers are woken with one
        call_soon_threadsafe per event loop per step, not one per request: each such call
        writes to the loop's self-pipe and costs the loop a wake-up."""
        by_row: dict[int, list[Event]] = {}
        for row, delta in events:
            by_row.setdefault(id(row), []).append(row.event(delta))
        done = {id(r) for r in finished}
        waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        for key in by_row.keys() | done:
            req = self._requests.pop(key) if key in done else self._requests[key]
            waiters += req._push(by_row.get(key, []), done=key in done, wake=False)
        wake_all(waiters)

    def _fail(self, error: BaseException) -> None:
        """End every request handed to the batch so far (all but the inbox's) with `error`."""
        with self._cond:
            queued = {id(r) for g in self._inbox for r in g}
            failed = [k for k in self._requests if k not in queued]
            requests = [self._requests.pop(k) for k in failed]
        for req in requests:
            req._push([], error=error)


class _Slots:
    """The KV cache of a running batch, as storage with room to spare: `n` rows decode, each
    in its own cache row; all rows write their next token at the shared slot `pos`, and row i's
    tokens fill slots pads[i]..pos (left of them: padding, never attended, and positions start
    at 0 on the first real token, as with KVCache's `pad`).

    Rows come and go at any step: a newcomer's keys and values, computed by a prefill of its
    own, are copied into a free row so that its prompt ends at `pos`; a finished row is
    overwritten by the last row. When a newcomer's prompt is longer than `pos`, every row
    moves right; when every row has padding on its left, every row moves left (so slots stay
    within reach of the window). Moves are whole key blocks when the cache stores keys in
    blocks (the C kernel's layout), so that they are plain slices.

    Storage grows by doubling, to `max_batch` rows. `view()` is a KVCache over the first `n`
    rows of the storage (views, not copies), which FastGPT decodes into as usual."""

    def __init__(self, net: FastGPT, max_batch: int):
        self.net, self.max_batch = net, max_batch
        self.store: KVCache | None = None  # capacity: store.k.shape[1] rows, store.max_len slots
        self.unit = net.new_cache(1, 1).key_block or 1  # slots per index of the keys' dim 3
        self.n = self.pos = 0
        self.pads: list[int] = []
        self._view: KVCache | None = None

    # -- storage --
    def _units(self, slots: int) -> int:
        return -(-slots // self.unit)

    def reserve(self, rows: int, slots: int) -> None:
        """Room for `rows` rows and `slots` slots; grows (by copying) when there is not."""
        store = self.store
        if store is not None and store.k.shape[1] >= rows and store.max_len >= slots:
            return
        have_rows, have_len = (0, 0) if store is None else (store.k.shape[1], store.max_len)
        B = min(self.max_batch, max(rows, 2 * have_rows if rows > have_rows else have_rows))
        T = max(slots, 2 * have_len if slots > have_len else have_len)
        new = self.net.new_cache(B, self._units(T) * self.unit)
        if store is not None and self.n:
            u = self._units(self.pos)
            new.k[:, : self.n, :, :u].copy_(store.k[:, : self.n, :, :u])
            new.v[:, : self.n, :, : self.pos].copy_(store.v[:, : self.n, :, : self.pos])
        self.store, self._view = new, None

    def shift(self, d: int) -> None:
        """Move every row `d` slots right (d > 0) or left (d < 0); d is whole units."""
        assert d % self.unit == 0 and min(self.pads, default=0) + d >= 0
        if d == 0 or self.n == 0:
            return
        self.reserve(self.n, self.pos + d + 1)
        k, v, n = self.store.k, self.store.v, self.n
        u, du = self._units(self.pos), d // self.unit
        lo = max(0, -du)  # the first unit that still holds something after the move
        k[:, :n, :, lo + du : u + du].copy_(k[:, :n, :, lo:u].clone())
        v[:, :n, :, lo * self.unit + d : self.pos + d].copy_(
            v[:, :n, :, lo * self.unit : self.pos].clone())
        self.pos += d
        self.pads = [p + d for p in self.pads]
        self._view = None

    def compact(self) -> None:
        """Move every row left by the padding they all have (in whole units)."""
        m = min(self.pads, default=0) // self.unit * self.unit
        if m:
            self.shift(-m)

    # -- rows --
    def splice(self, src: KVCache, src_rows: list[int], lengths: list[int]) -> None:
        """Append one row per entry of `src_rows`: that row of `src`, a prefill's cache whose
        prompts end at its last slot, holding a prompt of lengths[i] tokens (right-aligned).
        The caller made `src` with `align(...)`'s length, so its units line up with ours."""
        T = src.pos
        assert (self.pos - T) % self.unit == 0 and self.pos >= T
        self.reserve(self.n + len(src_rows), self.pos + 1)
        off, su = (self.pos - T) // self.unit, self._units(T)
        k, v = self.store.k, self.store.v
        for j, L in zip(src_rows, lengths):
            k[:, self.n, :, off : off + su].copy_(src.k[:, j, :, :su])
            v[:, self.n, :, self.pos - T : self.pos].copy_(src.v[:, j, :, :T])
            self.pads.append(self.pos - L)
            self.n += 1
        self._view = None

    def align(self, longest: int) -> int:
        """Get ready for newcomers whose longest prompt has `longest` tokens; returns the
        length their prefill's cache must have (its units then line up with ours)."""
        if self.n == 0:
            self.pos, self.pads = longest, []
            return longest
        T = longest + (self.pos - longest) % self.unit  # a little extra padding, < unit
        if T > self.pos:
            self.shift(T - self.pos)
        return T

    def drop(self, i: int) -> None:
        """Remove row i: the last row takes its place (the caller moves its own per-row
        state the same way)."""
        last = self.n - 1
        if i != last:
            u = self._units(self.pos)
            self.store.k[:, i, :, :u].copy_(self.store.k[:, last, :, :u])
            self.store.v[:, i, :, : self.pos].copy_(self.store.v[:, last, :, : self.pos])
            self.pads[i] = self.pads[last]
        self.pads.pop()
        self.n -= 1
        self._view = None

    def view(self, room: int) -> KVCache:
        """The first `n` rows as a KVCache at `pos`, ready for a decode step; `room`: the
        most tokens a row may still add (how far to grow when slots run out)."""
        if self.pos + 1 > self.store.max_len or (
                self.unit <= min(self.pads) and 4 * min(self.pads) >= self.pos):
            self.compact()  # slots run out, or padding is a quarter of all attention reads
            self.reserve(self.n, self.pos + max(room, 1))
        if self._view is None:
            view = copy.copy(self.store)
            view.k, view.v = self.store.k[:, : self.n], self.store.v[:, : self.n]
            view._per_layer()
            view.pad = torch.tensor(self.pads, dtype=torch.long, device=self.store.k.device)
            self._view = view
        self._view.pos = self.pos
        return self._view

    def advanced(self) -> None:
        """The decode step wrote slot `pos` of every row."""
        self.pos += 1


class _Batch:
    """The step machinery: the running rows of one engine, their cache and their next-token
    logits. `Engine.generate` / `stream` drive a private one from the caller's thread, the
    Scheduler one from its background thread; nothing else runs a decode loop.

    One `step()`:
    1. newcomers join (FIFO, while rows and the prefill budget last): their prompts, each
       distinct prompt once (n > 1 and repeated prompts fork), run through a prefill of their
       own, whose keys and values are spliced into free rows of the running cache;
    2. every row samples its next token from its logits (newcomers' from the prefill);
    3. finished and cancelled rows leave;
    4. the rest decode that token, which gives the next step's logits.
    A newcomer's first token thus comes one prefill after it was admitted, and running rows
    wait at most one prefill (PREFILL_TOKENS, padded) between tokens."""

    PREFILL_TOKENS = 2048  # padded prompt tokens per step's prefill (at least one prompt)

    def __init__(self, engine: Engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.waiting: deque[list[_Row]] = deque()  # groups: one submit's n rows join together
        self.n_waiting = 0  # rows in `waiting` (read from other threads)
        self.rows: list[_Row] = []  # in cache-row order
        self.logits: torch.Tensor | None = None  # (n, V): each row's next-token logits
        self.slots: _Slots | None = None
        self.settings: _Settings | None = None  # per-row sampling tensors; None: rebuild
        self._next: torch.Tensor | None = None  # (n,): sampled, not yet decoded

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows)

    def add(self, group: list[_Row]) -> None:
        self.waiting.append(group)
        self.n_waiting += len(group)

    def reset(self) -> list[_Row]:
        """Forget everything (after an error); the rows that were waiting or running."""
        rows = self.rows + [r for g in self.waiting for r in g]
        self.waiting, self.n_waiting, self.rows = deque(), 0, []
        self.logits = self.slots = self.settings = self._next = None
        return rows

    def step(self) -> tuple[list[tuple[_Row, str]], list[_Row]]:
        """One step: (row, text increment) for every token sampled, and the rows that ended
        (finished, cancelled, or asked for no tokens at all)."""
        out = self.sample()
        self.forward()
        return out

    def sample(self) -> tuple[list[tuple[_Row, str]], list[_Row]]:
        """Steps 1-3 of `step()`: what `step()` returns, before the decode. The Scheduler
        hands these tokens to its clients first and decodes (`forward()`) after, so that no
        token, a newcomer's first above all, waits for a decode it does not need."""
        if self._next is not None:  # a sample() without its forward(): do it now
            self.forward()
        with torch.inference_mode():
            # New weights (a training step between requests) apply from the first step with
            # an empty batch: the running rows finish on the weights their cache was made by.
            # (Engine.net() checks every weight's version: not a cost to pay at every step.)
            if self.slots is None or not self.rows:
                net = self.engine.net()
                if self.slots is None or self.slots.net is not net:
                    self.slots = _Slots(net, self.max_batch)
            net = self.slots.net
            ended = self._admit(net)
            for r in self.rows:
                if r.cancelled:  # set by another thread: read once per step
                    r.finish = "cancelled"
            if not self.rows:
                return [], ended
            if self.settings is None:
                self.settings = _Settings(self.rows, net.config.vocab_size, self.logits.device)
            nxt = self.settings.choose(self.logits, self.rows)  # (n,)
            if self.settings.want_logprobs:
                self.engine._record_logprobs(self.logits, nxt, self.rows, self.settings.top_n)
            events = [(r, r.add(t)) for r, t in zip(self.rows, nxt.tolist()) if r.finish is None]
            ended += self._leave(nxt)
            if self.rows:
                self._next = nxt[: len(self.rows)]
        return events, ended

    def forward(self) -> None:
        """Step 4 of `step()`: the rows still running decode the tokens `sample()` chose,
        which gives the next step's logits."""
        nxt, self._next = self._next, None
        if nxt is None or not self.rows:
            return
        with torch.inference_mode():
            view = self.slots.view(max(r.params.max_new_tokens - len(r.tokens)
                                       for r in self.rows))
            self.logits = self.slots.net.decode(nxt[:, None], view)[:, -1]  # (n, V)
            self.slots.advanced()

    def _admit(self, net: FastGPT) -> list[_Row]:
        """Take waiting groups while rows and the prefill budget last; prefill and splice
        them. Returns the rows that ended on arrival (cancelled, or max_new_tokens=0)."""
        ended, new = [], []
        while self.waiting:
            group = self.waiting[0]
            if all(r.cancelled for r in group) or group[0].params.max_new_tokens == 0:
                for r in group:
                    r.finish = "cancelled" if r.cancelled else "length"
                ended += group
            else:
                cand = new + group
                distinct = {tuple(r.prompt) for r in cand}
                cost = len(distinct) * max(len(r.prompt) for r in cand)
                if len(self.rows) + len(cand) > self.max_batch or (
                        new and cost > self.PREFILL_TOKENS):
                    break
                new = cand
            self.waiting.popleft()
            self.n_waiting -= len(group)
        if new:
            self._prefill(net, new)
        return ended

    def _prefill(self, net: FastGPT, new: list[_Row]) -> None:
        """Run the distinct prompts of `new` through the model in a cache of their own, then
        splice one cache row per request into the running cache."""
        prompts = list(dict.fromkeys(tuple(r.prompt) for r in new))  # distinct, in order
        which = {p: i for i, p in enumerate(prompts)}
        T = self.slots.align(max(map(len, prompts)))
        device = net.device
        pad = [T - len(p) for p in prompts]
        ids = torch.tensor([[0] * k + list(p) for k, p in zip(pad, prompts)], device=device)
        # No padding (one prompt, or prompts of one length): no pad tensor, so that FastGPT
        # runs plain causal attention rather than a masked one (its math path, ~2 ms a prompt).
        cache = net.new_cache(len(prompts), T, pad=torch.tensor(pad, device=device)
                              if any(pad) else None)
        h = net.hidden_states(ids, cache)  # (P, T, C)
        logits = net.logits(h[:, -1:])[:, -1]  # (P, V): the last position only
        src = [which[tuple(r.prompt)] for r in new]
        self.slots.splice(cache, src, [len(r.prompt) for r in new])
        src_t = torch.tensor(src, device=device)
        fresh = logits[src_t]  # (new, V)
        self.logits = fresh if self.logits is None or not self.rows else torch.cat(
            [self.logits[: len(self.rows)], fresh])
        self.rows += new
        self.settings = None

    def _leave(self, nxt: torch.Tensor) -> list[_Row]:
        """Drop the rows that ended this step from the cache (the last row fills each gap);
        `nxt` (n,) is reordered the same way, in place."""
        gone = [i for i, r in enumerate(self.rows) if r.finish is not None]
        ended = [self.rows[i] for i in gone]
        for i in reversed(gone):
            last = len(self.rows) - 1
            self.slots.drop(i)
            self.rows[i] = self.rows[last]
            nxt[i] = nxt[last]
            self.rows.pop()
        if gone:
            self.settings = None
            if not self.rows:
                self.logits = None
        return ended
