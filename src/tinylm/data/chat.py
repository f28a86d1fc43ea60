"""Conversations and the one chat renderer.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content"}`,
one JSONL line `{"messages": [...]}` per conversation: the format OpenAI and TRL use.

`render(tok, messages, template)` turns a conversation into token ids and a loss mask that is
1 exactly on the assistant's tokens (each assistant turn's content and its end token, e.g.
ChatML's `<|im_end|>` but not the newline the template writes after it) and 0
elsewhere. SFT, chat, the server, the reward model and PPO all render through it. A template
is a Jinja chat template, the Hugging Face convention, so a run's template travels into
`export-hf` and `AutoTokenizer.apply_chat_template` gives the same ids. tinylm's own runs use
`TEMPLATE`, over the reserved role tokens; an imported model keeps its own (ChatML, ...).

The mask is found the same way for any template: the assistant's tokens of turn i are what
rendering messages[:i+1] adds to rendering messages[:i] with the generation prompt. That
needs the template to render a conversation's prefix as a prefix of its ids, which every
common template does; one that does not is a UserError, not a silent wrong mask.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tinylm.data.split import held_out
from tinylm.errors import UserError
from tinylm.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")

# tinylm's template: <|role|>content<|end|> per message; the generation prompt opens an
# assistant turn. The role tokens are special tokens of every tinylm tokenizer.
TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass
class Rendered:
    ids: list[int]
    mask: list[int]  # 1 on the assistant's tokens


def check_messages(messages, where: str = "conversation") -> list[dict[str, str]]:
    """The messages as plain dicts; a UserError naming `where` for anything malformed."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of "
                        '{"role": ..., "content": ...}')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise UserError(f"{where}: message {i + 1} needs a string 'content'")
        if m.get("role") not in ROLES:
            raise UserError(f"{where}: message {i + 1} has role {m.get('role')!r}; use one of "
                            f"{', '.join(ROLES)}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_conversations(path: str | Path, need_assistant: bool = True) -> list[list[dict]]:
    """Every conversation of a JSONL file; malformed lines are UserErrors with their number."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such chat file; give a JSONL file of "
                        '{"messages": [...]} lines, or make the shipped set with '
                        "`tinylm data make-chat`")
    conversations = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "messages" not in row:
            raise UserError(f'{where}: expected an object with "messages"')
        messages = check_messages(row["messages"], where)
        if need_assistant and not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the conversation has no assistant turn to learn from")
        conversations.append(messages)
    if not conversations:
        raise UserError(f"{path}: the file holds no conversations")
    return conversations


_ENV = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """Compiling a template costs about 5 ms, rendering it microseconds: compile each once
    (compiling per call was 35 s of an SFT start on 3,500 conversations)."""
    return _ENV.from_string(template)


def render_text(messages: list[dict], template: str = TEMPLATE,
                add_generation_prompt: bool = False) -> str:
    try:
        return _compiled(template).render(messages=messages,
                                          add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raises many kinds; any of them is a broken template
        raise UserError(f"the chat template failed to render ({e}); fix the template") from None


def render(tok: Tokenizer, messages: list[dict], template: str = TEMPLATE,
           add_generation_prompt: bool = False) -> Rendered:
    """Token ids of the conversation and the mask of the assistant's tokens."""
    messages = check_messages(messages)
    ids = tok.encode(render_text(messages, template, add_generation_prompt))
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.encode(render_text(messages[:i], template, True))
        through = tok.encode(render_text(messages[: i + 1], template))
        if ids[: len(before)] != before or ids[: len(through)] != through:
            raise UserError("the chat template does not render a conversation's start as the "
                            "start of its ids; the assistant's tokens cannot be found")
        end = len(through) - separator_tail(tok, through[len(before):])
        mask[len(before) : end] = [1] * (end - len(before))
    return Rendered(ids, mask)


def separator_tail(tok: Tokenizer, turn: list[int]) -> int:
    """How many of an assistant turn's last tokens come after its closing special token and
    are only whitespace: ChatML's newline after <|im_end|>. That is the template's separator
    before the next turn, not something the assistant says (a chat stops at <|im_end|> and
    never generates it), so it is kept out of the mask. 0 where the turn ends in its special
    token (tinylm's <|end|>, Llama 3's <|eot_id|>) or has none."""
    for k in range(len(turn) - 1, -1, -1):
        if tok.decode([turn[k]], skip_special=True) == "":  # a special token
            tail = turn[k + 1 :]
            return len(tail) if not tok.decode(tail).strip() else 0
    return 0


class ChatData:
    """Rendered conversations as training examples: x = ids[:-1], y = ids[1:] with -100
    wherever the next token is not the assistant's, so the plain next-token loss is the
    assistant-only loss. Conversations longer than `block_size` + 1 tokens are cut at their
    end; batches are right-padded (padding comes after every real token, so a causal model
    needs no attention mask for it)."""

    def __init__(self, rendered: list[Rendered], block_size: int, pad_id: int):
        self.examples = []
        for r in rendered:
            ids, mask = r.ids[: block_size + 1], r.mask[: block_size + 1]
            if any(mask[1:]):  # something left to learn after the cut
                self.examples.append((ids, mask))
        self.pad_id = pad_id
        self.dropped = len(rendered) - len(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def collate(self, picks) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.examples[i] for i in picks]
        T = max(len(ids) for ids, _ in rows) - 1
        x = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        y = torch.full((len(rows), T), -100, dtype=torch.long)
        for b, (ids, mask) in enumerate(rows):
            n = len(ids) - 1
            x[b, :n] = torch.tensor(ids[:-1])
            y[b, :n] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
        return x, y  # (B, T) each

    def batch(self, B: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return self.collate(torch.randint(len(self), (B,), generator=gen).tolist())

    def batches(self, B: int):
        """Every example once, in order (evaluation)."""
        for i in range(0, len(self), B):
            yield self.collate(range(i, min(i + B, len(self))))


def split(conversations: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, the last `val_fraction` held out."""
    held = held_out(range(len(conversations)), val_fraction, seed, "conversations")
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])
