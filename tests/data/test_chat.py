"""The chat renderer: the mask covers exactly the assistant's tokens; bad chat files fail in
one line that names the line."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinylm.data.chat import TEMPLATE, read_conversations, render, render_text
from tinylm.errors import UserError
from tinylm.tokenizer import ASSISTANT, END, SYSTEM, USER, train_bpe, train_char

TEXT = "Once upon a time there was a girl named Mia. She had a red kite. Bonjour ! " * 30
TOKENIZERS = {"bpe": train_bpe(TEXT, 300), "char": train_char(TEXT)}
ROLE_TOKEN = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}

message = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]),
    "content": st.text(alphabet="Mia kite red. !éx\n", max_size=30),
})


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(message, min_size=1, max_size=6), kind=st.sampled_from(["bpe", "char"]))
def test_the_mask_is_one_exactly_on_assistant_tokens(messages, kind):
    tok = TOKENIZERS[kind]
    out = render(tok, messages)
    ids, mask = [], []
    for m in messages:  # what the template says, turn by turn
        body = tok.encode(m["content"]) + [tok.special_id(END)]
        ids += [tok.special_id(ROLE_TOKEN[m["role"]])] + body
        mask += [0] + [int(m["role"] == "assistant")] * len(body)
    assert out.ids == ids and out.mask == mask


def test_the_generation_prompt_opens_an_assistant_turn():
    tok = TOKENIZERS["bpe"]
    out = render(tok, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert out.ids[-1] == tok.special_id(ASSISTANT) and not any(out.mask)


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_an_imported_template_masks_its_assistant_turns():
    tok = train_bpe(TEXT, 300)
    tok.hf.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    convo = [{"role": "user", "content": "Mia"}, {"role": "assistant", "content": "red kite"}]
    out = render(tok, convo, CHATML)
    masked = tok.decode([i for i, m in zip(out.ids, out.mask) if m])
    assert masked == "red kite<|im_end|>"  # not the newline ChatML writes after it
    assert render_text(convo, CHATML).startswith("<|im_start|>user\nMia<|im_end|>")
    assert render_text(convo) == "<|user|>Mia<|end|><|assistant|>red kite<|end|>"
    assert TEMPLATE != CHATML


@pytest.mark.parametrize("line, message", [
    ("{not json", "chat.jsonl:2: not valid JSON"),
    ('{"text": "hi"}', 'chat.jsonl:2: expected an object with "messages"'),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "chat.jsonl:2: message 1 has role "
     "'robot'; use one of system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "chat.jsonl:2: the conversation has "
     "no assistant turn"),
    ('{"messages": []}', "chat.jsonl:2: 'messages' must be a non-empty list"),
])
def test_malformed_chat_lines_are_named(tmp_path, line, message):
    good = json.dumps({"messages": [{"role": "user", "content": "a"},
                                    {"role": "assistant", "content": "b"}]})
    path = tmp_path / "chat.jsonl"
    path.write_text(good + "\n" + line + "\n")
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        read_conversations(path)


def test_an_empty_chat_file_is_an_error(tmp_path):
    (tmp_path / "chat.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no conversations"):
        read_conversations(tmp_path / "chat.jsonl")
