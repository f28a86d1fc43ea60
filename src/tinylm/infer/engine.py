"""Text generation: the one engine behind sampling, chat, the server, PPO rollouts and labeling.

`Engine.generate` takes a batch of prompts (text or token ids), each with its own
`SamplingParams`, and runs them together: one *prefill* pass writes every prompt's keys and
values into a preallocated `KVCache`, then each *decode* step feeds only the newest token of
every row. Prompts of different lengths are left-padded; the cache's `pad` counts keep the
padding out of attention and start each row's positions at 0, so a row's tokens do not depend
on its batch mates. Rows that finish keep riding along (their outputs are ignored) until at
least half the batch is done; then the cache is compacted, so finished requests stop costing
compute without a costly copy at every step.

`naive_generate` runs the whole model over the whole sequence at every step: slow, obviously
correct, and kept as the reference the engine is tested against token for token. Both share the
numerics of sampling (`apply_penalties`, `sampling_probs`, `sample_from`), so they can only
differ in how the logits were computed.

Logprobs are those of the model's own distribution (softmax of the raw logits, before
penalties, temperature and top-k/top-p), as PPO needs and as vLLM reports by default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from tinylm.errors import UserError
from tinylm.infer.fast import FastGPT, check_supported, resolve_dtype
from tinylm.models.gpt import GPT


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
    finish_reason: str  # "stop" (stop token or string) | "length" (max_new_tokens)
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
        return Completion(self.text, self.tokens, self.finish or "length", self.prompt,
                          self.logprobs if self.params.logprobs else None,
                          self.top if self.params.top_logprobs else None)


class _Settings:
    """Per-row sampling settings as tensors, so one step samples the whole batch at once."""

    def __init__(self, rows: list[_Row], V: int, device: torch.device):
        ps = [r.params for r in rows]
        self.any_sampled = any(not p.greedy for p in ps)
        self.penalized = any(p.penalized for p in ps)
        self.want_logprobs = any(p.logprobs or p.top_logprobs for p in ps)
        self.top_n = max(p.top_logprobs for p in ps)

        def col(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        self.greedy = col([p.greedy for p in ps], torch.bool)
        self.temperature = col([p.temperature for p in ps])[:, None]
        self.top_k = col([p.top_k for p in ps], torch.long)
        self.top_p = col([p.top_p for p in ps])[:, None]
        self.bias = bias_rows(ps, V, device)
        if self.penalized:
            self.repetition = col([p.repetition_penalty for p in ps])[:, None]
            self.frequency = col([p.frequency_penalty for p in ps])[:, None]
            self.presence = col([p.presence_penalty for p in ps])[:, None]
            self.seen = torch.zeros(len(rows), V, dtype=torch.bool, device=device)
            for i, r in enumerate(rows):
                self.seen[i, r.prompt] = True
            self.counts = torch.zeros(len(rows), V, device=device)

    def select(self, keep: torch.Tensor) -> None:
        for name in ("greedy", "temperature", "top_k", "top_p", "bias", "repetition",
                     "frequency", "presence", "seen", "counts"):
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name)[keep])

    def choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Next token ids (B,) from logits (B, V) under each row's settings."""
        if self.bias is not None:
            logits = logits + self.bias
        if self.penalized:
            logits = apply_penalties(logits, self.seen, self.counts, self.repetition,
                                     self.frequency, self.presence)
        nxt = logits.argmax(-1)
        if self.any_sampled:
            probs = sampling_probs(logits, self.temperature, self.top_k, self.top_p)
            # One uniform per row: from the row's own generator when it has a seed (so its
            # text does not depend on its batch mates), else from the global RNG.
            u = torch.rand(len(rows), device=logits.device)
            for i, r in enumerate(rows):
                if r.gen is not None:
                    u[i] = torch.rand(1, generator=r.gen).item()
            nxt = torch.where(self.greedy, nxt, sample_from(probs, u))
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
    prompts and output."""

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

    def net(self) -> FastGPT:
        """What runs the forward passes: the model's `FastGPT` twin, rebuilt whenever the
        model's weights changed since (an optimizer step or a load bumps each tensor's
        version counter), so generation always sees the current weights."""
        key = tuple((id(p), p._version) for p in self.model.parameters())
        if key != self._fast_key:
            self._fast, self._fast_key = FastGPT(self.model, self.dtype), key
        return self._fast

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

    def _groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """Batches that fit: the longest prompt plus the most new tokens of a batch must fit
        the window (rows are left-padded to the longest prompt)."""
        groups: list[list[_Row]] = []
        cur: list[_Row] = []
        for r in sorted(rows, key=lambda r: len(r.prompt)):
            cand = cur + [r]
            need = max(len(x.prompt) for x in cand) + max(x.params.max_new_tokens for x in cand)
            if cur and (len(cand) > self.max_batch or need > self.block_size):
                groups.append(cur)
                cand = [r]
            cur = cand
        return groups + ([cur] if cur else [])

    # -- the loop --
    def _run(self, rows: list[_Row]) -> Iterator[tuple[_Row, str]]:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            for group in self._groups(rows):
                yield from self._run_group(group)
        finally:
            model.train(was_training)

    def _run_group(self, rows: list[_Row]) -> Iterator[tuple[_Row, str]]:
        model = self.net()
        device = next(self.model.parameters()).device
        for r in rows:
            if r.params.max_new_tokens == 0:
                r.finish = "length"
        live = [r for r in rows if r.finish is None]
        if not live:
            return
        with torch.inference_mode():
            P = max(len(r.prompt) for r in live)
            pad = [P - len(r.prompt) for r in live]
            ids = torch.tensor([[0] * n + r.prompt for n, r in zip(pad, live)], device=device)
            steps = max(r.params.max_new_tokens for r in live)
            cache = model.new_cache(len(live), P + steps,
                                    pad=torch.tensor(pad, device=device) if any(pad) else None)
            settings = _Settings(live, model.config.vocab_size, device)
            logits = self._prefill(model, ids, cache)  # (B, V)
        while True:
            with torch.inference_mode():
                nxt = settings.choose(logits, live)  # (B,)
                if settings.want_logprobs:
                    self._record_logprobs(logits, nxt, live, settings.top_n)
            events = [(r, r.add(t)) for r, t in zip(live, nxt.tolist()) if r.finish is None]
            yield from events
            done = [r.finish is not None for r in live]
            if all(done):
                return
            with torch.inference_mode():
                if 2 * sum(done) >= len(live):  # compact: drop the finished rows
                    keep = [i for i, d in enumerate(done) if not d]
                    keep_t = torch.tensor(keep, device=device)
                    cache.select(keep_t)
                    settings.select(keep_t)
                    nxt, live = nxt[keep_t], [live[i] for i in keep]
                logits = model.decode(nxt[:, None], cache)[:, -1]  # (B, V)

    @staticmethod
    def _prefill(model: FastGPT, ids: torch.Tensor, cache) -> torch.Tensor:
        """Run the prompts through the model, filling the cache; logits (B, V) of the last
        position only (the full (B, T, V) would be wasted work for long prompts)."""
        h = model.hidden_states(ids, cache)  # (B, T, C)
        return model.logits(h[:, -1:])[:, -1]

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
