"""`tinylm data make-chat`: deterministic, and the held-out requests are new combinations."""

from __future__ import annotations

import json

from tinylm.cli import main
from tinylm.data.chat import read_conversations
from tinylm.feedback.guidelines import follows_request


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_make_chat_is_deterministic_and_holds_out_new_combinations(tmp_path, capsys):
    assert main(["data", "make-chat", "--out", str(tmp_path / "a")]) == 0
    assert main(["data", "make-chat", "--out", str(tmp_path / "b")]) == 0
    assert "train_story" in capsys.readouterr().out
    for name in ("chat-train.jsonl", "chat-heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, held = rows(tmp_path / "a" / "chat-train.jsonl"), rows(tmp_path / "a" /
                                                                    "chat-heldout.jsonl")
    combo = lambda r: (r["name"], r["object"])  # noqa: E731
    train_combos = {combo(r) for r in train if r["task"] == "story"}
    held_stories = [r for r in held if r["task"] == "story"]
    assert held_stories and not {combo(r) for r in held_stories} & train_combos
    names, objects = {n for n, _ in train_combos}, {o for _, o in train_combos}
    assert any(r["name"] in names and r["object"] in objects for r in held_stories)
    for r in train + held:  # every story answer does what its request asks
        if r["task"] == "story":
            assert follows_request(r["messages"][1]["content"], r["name"], r["object"])
    assert {r["task"] for r in train} == {"story", "translate", "about"}
    assert len(read_conversations(tmp_path / "a" / "chat-train.jsonl")) == len(train)


def test_follows_request():
    assert follows_request("Mia had a red kite. She flew it.", "Mia", "kite")
    assert follows_request("Mia saw two kites.", "Mia", "kite")
    assert not follows_request("Mia had a red kite and", "Mia", "kite")  # unfinished
    assert not follows_request("Lily had a red kite.", "Mia", "kite")
    assert not follows_request("Mia had a ball.", "Mia", "kite")
