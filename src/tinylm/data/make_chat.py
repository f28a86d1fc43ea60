"""`tinylm data make-chat`: a dialogue set made from the shipped corpora, deterministically.

The recipe (docs/chat.md says it at length):
- **story requests.** Every TinyStories paragraph that names a character ("a little girl
  named Lily") is cut, from that sentence, to at most `max_words` words ending at a sentence
  end; if it holds one of `OBJECTS`, the user asks "Tell me a story about a girl named Lily
  and a ball.", and the assistant answers with the excerpt, its first sentence replaced by one
  that names both ("Once upon a time, there was a girl named Lily who had a ball."), as a
  person answering the request would open.
- **a follow-up** on every other story: "What was the girl's name?" -> "Her name was Lily."
  (his / its after a boy's or an animal's story), which the story answers.
- **translation.** "Translate to French: I am cold." -> "J'ai froid." from the eng-fra pairs.
- **about tinylm.** A few turns ("Who are you?").

Held-out requests are new combinations: a (name, object) pair is held out when a hash of it
falls in the held-out share, so its name and its object each appear in training with others,
never together. Translation sources are held out the same way.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tinylm.data.pairs import read_pairs
from tinylm.data.text import load_text
from tinylm.files import atomic_write_text

OBJECTS = ["ball", "kite", "toy", "cake", "car", "book", "doll", "box", "hat", "boat",
           "apple", "balloon", "bike", "truck", "train", "cookie", "flower", "tree", "stick",
           "rock", "shell", "cup", "bag", "bed", "drum", "key", "ring", "sock", "shoe", "map"]
HER = {"girl": "Her", "boy": "His", "mom": "Her", "dad": "His", "lady": "Her", "man": "His"}
ABOUT = [
    ("Who are you?", "I am a small language model, made with tinylm and trained on "
                     "children's stories."),
    ("What can you do?", "I can tell short stories, answer questions about them, and "
                         "translate simple sentences to French."),
    ("Who made you?", "I was trained with tinylm, from pre-training to chat, on a laptop."),
    ("Hello!", "Hello! Ask me for a story about someone and something."),
]
NAMED = re.compile(r"\b(?:a|an) (?:[a-z]+ ){0,2}?([a-z]+) named ([A-Z][a-z]+)")
SENTENCE = re.compile(r"[^.!?]*[.!?]+[\"']?\s*")


def held(key: str, fraction: float) -> bool:
    """A stable, uniform choice of `fraction` of all keys."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) < fraction * 0x100000000


def story_requests(text: str, max_words: int) -> list[dict]:
    """(kind, name, object, excerpt) of every story opening that fits the recipe."""
    out = []
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        m = NAMED.search(para)
        if m is None:
            continue
        kind, name = m.groups()
        excerpt, words = "", 0
        for sentence in SENTENCE.findall(para[para.rfind(".", 0, m.start()) + 1:]):
            n = len(sentence.split())
            if words + n > max_words:
                break
            excerpt, words = excerpt + sentence, words + n
        excerpt = excerpt.strip()
        found = [o for o in OBJECTS if re.search(rf"\b{o}\b", excerpt)]
        if name in excerpt and found and len(excerpt.split()) >= 12:
            obj = found[0]
            # The story's own first sentence gives way to one that names both, the way a
            # person answering the request would open: "... a girl named Lily who had a ball."
            rest = excerpt[len(SENTENCE.match(excerpt).group(0)):].strip()
            opening = f"Once upon a time, there was a {kind} named {name} who had {_a(obj)}."
            out.append({"kind": kind, "name": name, "object": obj,
                        "story": f"{opening} {rest}".strip()})
    return out


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def story_conversation(r: dict, follow_up: bool) -> dict:
    request = f"Tell me a story about a {r['kind']} named {r['name']} and {_a(r['object'])}."
    messages = [{"role": "user", "content": request},
                {"role": "assistant", "content": r["story"]}]
    if follow_up:
        pronoun = HER.get(r["kind"], "Its")
        messages += [{"role": "user", "content": f"What was the {r['kind']}'s name?"},
                     {"role": "assistant", "content": f"{pronoun} name was {r['name']}."}]
    return {"messages": messages, "task": "story", "name": r["name"], "object": r["object"]}


def make_chat(out_dir: str | Path, held_fraction: float = 0.1, max_words: int = 60,
              translations: int = 600) -> dict[str, int]:
    """Write chat-train.jsonl and chat-heldout.jsonl into `out_dir`; returns the counts."""
    out_dir = Path(out_dir)
    train, heldout = [], []
    for i, r in enumerate(story_requests(load_text("tinystories"), max_words)):
        combo = f"{r['name']}|{r['object']}"
        (heldout if held(combo, held_fraction) else train).append(
            story_conversation(r, follow_up=i % 2 == 0))
    pairs = read_pairs("eng-fra").pairs
    sources = sorted({p.src for p in pairs})[:translations]
    first = {}
    for p in pairs:
        first.setdefault(p.src, p.tgt)
    for src in sources:
        convo = {"messages": [{"role": "user", "content": f"Translate to French: {src}"},
                              {"role": "assistant", "content": first[src]}],
                 "task": "translate", "refs": sorted({p.tgt for p in pairs if p.src == src})}
        (heldout if held(src, held_fraction) else train).append(convo)
    for q, a in ABOUT:
        train.append({"messages": [{"role": "user", "content": q},
                                   {"role": "assistant", "content": a}], "task": "about"})
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("chat-train.jsonl", train), ("chat-heldout.jsonl", heldout)):
        atomic_write_text(out_dir / name, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                                  for r in rows))
    count = lambda rows, task: sum(r["task"] == task for r in rows)  # noqa: E731
    return {f"{split}_{task}": count(rows, task) for split, rows in
            (("train", train), ("heldout", heldout)) for task in ("story", "translate", "about")}
