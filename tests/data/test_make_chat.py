"""`tinylm data make-chat`: deterministic, the held-out requests are new combinations asked
of stories never trained on, and every answer does what its request asks."""

from __future__ import annotations

import json
import re
from collections import Counter

from tinylm.cli import main
from tinylm.data.chat import read_conversations
from tinylm.data.make_chat import story_conversations, story_passages
from tinylm.feedback.guidelines import follows_request

STORY = (
    "Once upon a time, there was a little girl named Lily. Lily had a red ball. She played "
    "with the ball every day in the park.\n\n"
    "One day, Lily saw a big tree. She wanted to climb the tree with her ball. Lily's mom "
    "said no.\n\n"
    "Once upon a time, there was a dog. The dog had a ball.\n\n"  # nobody named: no passage
    "Lily came back and played with a box. It was fun to sit in the box all day.\n\n"
)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def after_opening(r: dict) -> str:
    """A story answer without its opening sentence, its character's name blanked: the
    corpus passage it retells."""
    story = r["messages"][1]["content"]
    return re.sub(rf"\b{r['name']}\b", "_", story[story.index(".") + 1:])


def test_passages_come_from_the_named_story_and_stop_at_the_next_story():
    passages = story_passages(STORY, max_words=40)
    assert [(p["kind"], p["name"]) for p in passages] == [("girl", "Lily")] * 2
    assert passages[0]["passage"].startswith("Lily had a red ball.")  # after the introduction
    assert passages[1]["passage"].startswith("One day, Lily saw a big tree.")
    assert all("box" not in p["passage"] for p in passages)  # after "Once upon a time"
    short = story_passages(STORY, max_words=15)  # whole sentences only, 8 words at least
    assert [p["passage"] for p in short] == ["Lily had a red ball. She played with the ball "
                                             "every day in the park."]


def test_each_request_retells_the_passage_about_the_requested_name():
    three = "".join(STORY.replace("Lily", n) for n in ("Lily", "Mia", "Sue"))  # three girls
    passages = story_passages(three, max_words=40)
    train, held = story_conversations(passages, held_fraction=0.0, per_object=2, max_names=2)
    assert not held and train
    for r in train:
        story = r["messages"][1]["content"]
        assert story.startswith(f"Once upon a time, there was a girl named {r['name']} who had "
                                f"a {r['object']}.")
        others = {"Lily", "Mia", "Sue"} - {r["name"]}
        assert not any(re.search(rf"\b{n}\b", story) for n in others), story
        assert follows_request(story, r["name"], r["object"])
    assert {r["object"] for r in train} == {"ball", "tree"}


def test_make_chat_is_deterministic_and_holds_out_new_combinations(tmp_path, capsys):
    assert main(["data", "make-chat", "--out", str(tmp_path / "a")]) == 0
    assert main(["data", "make-chat", "--out", str(tmp_path / "b")]) == 0
    assert "train_story" in capsys.readouterr().out
    for name in ("chat-train.jsonl", "chat-heldout.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, held = rows(tmp_path / "a" / "chat-train.jsonl"), rows(tmp_path / "a" /
                                                                    "chat-heldout.jsonl")
    combo = lambda r: (r["name"], r["object"])  # noqa: E731
    stories = [r for r in train if r["task"] == "story"]
    held_stories = [r for r in held if r["task"] == "story"]
    train_combos = {combo(r) for r in stories}
    assert len(held_stories) >= 50 and not {combo(r) for r in held_stories} & train_combos
    assert len({(r["messages"][0]["content"]) for r in held_stories}) == len(held_stories)
    names, objects = {n for n, _ in train_combos}, {o for _, o in train_combos}
    assert all(r["name"] in names and r["object"] in objects for r in held_stories)
    assert not {after_opening(r) for r in held_stories} & {after_opening(r) for r in stories}
    for r in stories + held_stories:  # every story answer does what its request asks
        assert follows_request(r["messages"][1]["content"], r["name"], r["object"])
    per_object = Counter(r["object"] for r in stories)  # no object dominates
    assert max(per_object.values()) < 0.1 * len(stories)
    assert {r["task"] for r in train} == {"story", "translate", "about"}
    assert len(stories) > 3 * sum(r["task"] == "translate" for r in train)
    assert len(read_conversations(tmp_path / "a" / "chat-train.jsonl")) == len(train)


def test_follows_request():
    assert follows_request("Mia had a red kite. She flew it.", "Mia", "kite")
    assert follows_request("Mia saw two kites.", "Mia", "kite")
    assert not follows_request("Mia had a red kite and", "Mia", "kite")  # unfinished
    assert not follows_request("Lily had a red kite.", "Mia", "kite")
    assert not follows_request("Mia had a ball.", "Mia", "kite")
