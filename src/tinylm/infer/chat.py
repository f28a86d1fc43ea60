"""A conversation with a chat model: history, the chat template, the generation engine.

`ChatSession` is what `tinylm chat` drives, and what any other front end can: `say(text)`
adds the user's turn and returns a stream of the assistant's answer (text increments, from
the one engine); when the stream ends, or is closed early (Ctrl-C), its text joins the
history. Prompts are rendered by the one renderer (data/chat.py) through the run's template,
so the model sees exactly the format it was fine-tuned on. The answer ends at the token the
template closes an assistant turn with (tinylm's <|end|>, ChatML's <|im_end|>, ...).
"""

from __future__ import annotations

import dataclasses

from tinylm.data import chat
from tinylm.errors import UserError
from tinylm.infer.engine import Engine, SamplingParams, TextStream
from tinylm.infer.explain import format_steps


def turn_end_ids(tok, template: str) -> list[int]:
    """The token(s) that `template` puts right after an assistant's content: where an answer
    stops. Found by rendering a probe conversation, so it holds for any template."""
    probe = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    r = chat.render(tok, probe, template)
    answer = [i for i, m in zip(r.ids, r.mask) if m]
    content = tok.encode("b")
    if answer[: len(content)] != content or len(answer) == len(content):
        raise UserError("the chat template does not end an assistant turn with a token; "
                        "tinylm chat cannot tell where an answer stops")
    return [answer[len(content)]]


class ChatSession:
    def __init__(self, engine: Engine, template: str, params: SamplingParams,
                 system: str = "", explain_k: int = 5):
        self.engine, self.tok, self.template = engine, engine.tok, template
        stops = turn_end_ids(self.tok, template)
        self.params = dataclasses.replace(params, stop_token_ids=stops, logprobs=True,
                                          top_logprobs=explain_k + 1)
        self.system, self.explain_k = system, explain_k
        self.history: list[dict[str, str]] = []
        self.last: TextStream | None = None

    def reset(self) -> None:
        self.history, self.last = [], None

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def _prompt(self) -> tuple[list[int], int]:
        """The rendered conversation, oldest turns dropped until the answer fits."""
        block = self.engine.block_size
        while True:
            ids = chat.render(self.tok, self.messages(), self.template,
                              add_generation_prompt=True).ids
            room = block - len(ids)
            if room >= min(self.params.max_new_tokens, block // 4) or len(self.history) <= 1:
                break
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]
        if room < 1:
            raise UserError(f"the message is {len(ids)} tokens with the template, more than "
                            f"the model's {block}-token window; write a shorter one or /reset")
        return ids, min(self.params.max_new_tokens, room)

    def say(self, text: str) -> TextStream:
        self.history.append({"role": "user", "content": text})
        try:
            ids, n = self._prompt()
        except UserError:
            self.history.pop()
            raise
        stream = self.engine.stream(ids, dataclasses.replace(self.params, max_new_tokens=n))
        self.last = stream
        return stream

    def answered(self, stream: TextStream) -> str:
        """Put the (possibly stopped) answer into the history; returns its text."""
        text = stream.completion.text
        self.history.append({"role": "assistant", "content": text})
        return text

    def explain(self) -> str:
        if self.last is None:
            raise UserError("nothing to explain yet: say something first")
        return format_steps(self.tok, self.last.completion, self.explain_k)
