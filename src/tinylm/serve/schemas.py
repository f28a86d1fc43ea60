"""Request bodies of the OpenAI-compatible API, as pydantic models.

They are what FastAPI validates each body against and what its OpenAPI schema (`/openapi.json`)
publishes, so the schema a client or schemathesis reads is the one the server enforces. Field
names, defaults and ranges follow OpenAI's API; a few vLLM extensions (`top_k`, `ignore_eos`,
`repetition_penalty`) are accepted too. Unknown fields are refused (OpenAI does the same), so a
misspelt parameter is a 400, not a silently ignored setting.

Static ranges live here; limits that depend on the run or the server's flags (the context
window, `--max-n`, ...) are checked in app.py, where they are known.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_N = 16  # choices per prompt
MAX_PROMPTS = 64  # prompts in one completions request
MAX_STOP = 4  # stop strings, as OpenAI
MAX_TOP_LOGPROBS = 20
MAX_TOKENS_FIELD = 1 << 20  # schema bound; the window (block_size) is checked at run time
SEED_MAX = (1 << 63) - 1

TokenId = Annotated[int, Field(ge=0, le=(1 << 31) - 1)]
StopString = Annotated[str, Field(min_length=1, max_length=256)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None
TokenList = Annotated[list[TokenId], Field(max_length=1 << 16)]
Prompt = (str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenList
          | Annotated[list[TokenList], Field(min_length=1, max_length=MAX_PROMPTS)])


class Strict(BaseModel):
    # allow_inf_nan=False: Python's json accepts NaN and Infinity, which no field here means.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    """The fields completions and chat share."""

    model: str = Field(max_length=512, description="the id /v1/models lists")
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_FIELD,
                                   description="new tokens at most; prompt + this must fit "
                                               "the context window")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1 << 20, description="vLLM extension; 0 = off")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX,
                             description="the same seed gives the same text, in any batch")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="vLLM extension; 1 = off")
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(
        None, max_length=1024, description="token id (as a string) -> added to its logit")
    ignore_eos: bool = Field(False, description="vLLM extension: keep going past <|eos|>")
    user: str | None = Field(None, max_length=256)


class CompletionRequest(Sampling):
    prompt: Prompt = Field(description="text, texts, token ids, or lists of token ids")
    max_tokens: int | None = Field(16, ge=0, le=MAX_TOKENS_FIELD)
    echo: bool = Field(False, description="put the prompt before the completion (and its "
                                          "logprobs, with logprobs)")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                 description="logprob of each token and this many alternatives")


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str = Field(max_length=1 << 20)
    name: str | None = Field(None, max_length=64)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS_FIELD,
                                              description="OpenAI's newer name of max_tokens")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class SuggestRequest(Strict):
    """The autocomplete page's question: the likely next words after `text`."""

    text: str = Field(max_length=1 << 16)
    k: int = Field(5, ge=1, le=10, description="how many words")
    max_word_tokens: int = Field(12, ge=1, le=32, description="tokens one word may take")
