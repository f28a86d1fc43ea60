"""`tinylm data make-chat`: a dialogue set made from the shipped corpora, deterministically.

The recipe (docs/chat.md says it at length):
- **story passages.** Walking TinyStories paragraph by paragraph, a sentence like "there was
  a little girl named Lily" introduces a story's character; that paragraph (from that
  sentence on) and each later paragraph of the same story that names Lily is a passage, cut
  to at most `max_words` words at a sentence end. Each of `OBJECTS` a passage mentions makes
  one request ("Tell me a story about a girl named Mia and a ball."), answered with a
  sentence that names both ("Once upon a time, there was a girl named Mia who had a ball.")
  and then the passage, with the story's own name replaced by the requested one throughout
  (the introducing sentence gives way to the new opening).
- **many names.** Each (passage, object) is asked with several names of the character's kind
  (girls' names for a girl, ...; the names the corpus gives), more for rare objects, so every
  object is asked roughly equally often and the model learns to copy the object and the
  name out of the request rather than to guess the corpus' favourite ("a toy", "Lily").
- **a follow-up** on every other story: "What was the girl's name?" -> "Her name was Mia."
  (his / its after a boy's or an animal's story), which the story answers.
- **translation.** "Translate to French: I am cold." -> "J'ai froid." from the eng-fra pairs.
- **about tinylm.** A few turns ("Who are you?").

Held out are new requests: a (name, object) combination is held out when a hash of it falls
in the held-out share, so every held-out name and object appears in training with others,
never together; held-out requests are also answered from held-out stories (a hash of the
introducing sentence), whose passages are never trained on. Translation sources are held
out by a hash as well.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
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
TITLES = {"Mr", "Mrs", "Ms", "Miss", "Dr", "Sir", "Mister"}  # "named Mr. Brown": no first name
SENTENCE = re.compile(r"[^.!?]*[.!?]+[\"']?\s*")


def held(key: str, fraction: float) -> bool:
    """A stable, uniform choice of `fraction` of all keys."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) < fraction * 0x100000000


def _rank(key: str) -> str:
    """A stable pseudo-random order (sort by it) that needs no seeded generator."""
    return hashlib.sha256(key.encode()).hexdigest()


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def _mentions(text: str, word: str) -> bool:
    return re.search(rf"\b{word}s?\b", text) is not None


def _cut(text: str, max_words: int) -> str:
    """The longest run of whole sentences from the start of `text` within `max_words`."""
    out, words = "", 0
    for sentence in SENTENCE.findall(text):
        n = len(sentence.split())
        if words + n > max_words:
            break
        out, words = out + sentence, words + n
    return out.strip()


def story_passages(text: str, max_words: int) -> list[dict]:
    """{kind, name, story (its introducing paragraph), passage} of every passage of the
    recipe: the introducing paragraph after its introducing sentence, or a later paragraph
    of the same story that names the character."""
    out, cur = [], None
    for para in text.split("\n\n"):
        para = " ".join(para.split())
        m = NAMED.search(para)
        if m is not None:
            start = para[para.rfind(".", 0, m.start()) + 1:].lstrip()
            first = SENTENCE.match(start)
            if first is None or m.group(2) in TITLES:
                cur = None
                continue
            cur = {"kind": m.group(1), "name": m.group(2), "story": para}
            para = start[len(first.group(0)):]
        elif para.startswith("Once upon a time"):  # a new story, with nobody named yet
            cur = None
            continue
        if cur is None or not re.search(rf"\b{cur['name']}\b", para):
            continue
        passage = _cut(para, max_words)
        if len(passage.split()) >= 8:
            out.append(cur | {"passage": passage})
    return out


def name_pools(passages: list[dict]) -> dict[str, list[str]]:
    """The names the corpus gives each kind of character: girls', boys', and everyone
    else's (animals, toys, ...), most frequent first."""
    pools: dict[str, Counter] = {"girl": Counter(), "boy": Counter(), "other": Counter()}
    for p in {(p["story"], p["kind"], p["name"]) for p in passages}:
        pools[_group(p[1])][p[2]] += 1
    # a name goes with the group that gives it most often ("Jack" is a boy's name here)
    home = {n: max(pools, key=lambda k: (pools[k][n], k)) for c in pools.values() for n in c}
    return {k: [n for n, _ in sorted(c.items(), key=lambda x: (-x[1], x[0])) if home[n] == k]
            for k, c in pools.items()}


def _group(kind: str) -> str:
    return kind if kind in ("girl", "boy") else "other"


def answer(p: dict, name: str, obj: str) -> str:
    """The passage retold about `name`, after an opening that names `name` and `obj`."""
    opening = f"Once upon a time, there was a {p['kind']} named {name} who had {_a(obj)}."
    retold = re.sub(rf"\b{p['name']}\b", name, p["passage"])
    return f"{opening} {retold}"


def story_conversation(p: dict, name: str, obj: str, follow_up: bool) -> dict:
    request = f"Tell me a story about a {p['kind']} named {name} and {_a(obj)}."
    messages = [{"role": "user", "content": request},
                {"role": "assistant", "content": answer(p, name, obj)}]
    if follow_up:
        pronoun = HER.get(p["kind"], "Its")
        messages += [{"role": "user", "content": f"What was the {p['kind']}'s name?"},
                     {"role": "assistant", "content": f"{pronoun} name was {name}."}]
    return {"messages": messages, "task": "story", "name": name, "object": obj}


def story_conversations(passages: list[dict], held_fraction: float, per_object: int,
                        max_names: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) story requests. Training asks each (passage, object) with about
    `per_object` / (the object's passage count) names (1 to `max_names`), so that rare
    objects are asked as often as common ones; held-out stories are asked once per
    (passage, object), with a name whose combination with the object is held out."""
    pools = name_pools(passages)
    asked = [(p, o) for p in passages for o in OBJECTS if _mentions(p["passage"], o)]
    count = Counter(o for _, o in asked)
    train, heldout, seen = [], [], set()
    for i, (p, o) in enumerate(asked):
        held_story = held(p["story"], held_fraction)
        names = sorted((n for n in pools[_group(p["kind"])]
                        if held(f"{n}|{o}", held_fraction) == held_story
                        and not re.search(rf"\b{n}\b", p["passage"].replace(p["name"], ""))),
                       key=lambda n: _rank(f"{i}|{n}"))
        if held_story:
            names = [n for n in names if (p["kind"], n, o) not in seen][:1]
            seen.update((p["kind"], n, o) for n in names)
        else:
            names = names[:max(1, min(max_names, round(per_object / count[o])))]
        for n in names:
            convo = story_conversation(p, n, o, follow_up=_rank(f"{i}|{n}|f") < "8")
            (heldout if held_story else train).append(convo)
    # a held-out request combines a name and an object that training asks about separately
    names, objects = {r["name"] for r in train}, {r["object"] for r in train}
    return train, [r for r in heldout if r["name"] in names and r["object"] in objects]


def make_chat(out_dir: str | Path, held_fraction: float = 0.1, max_words: int = 40,
              per_object: int = 160, max_names: int = 12, translations: int = 600
              ) -> dict[str, int]:
    """Write chat-train.jsonl and chat-heldout.jsonl into `out_dir`; returns the counts."""
    out_dir = Path(out_dir)
    passages = story_passages(load_text("tinystories"), max_words)
    train, heldout = story_conversations(passages, held_fraction, per_object, max_names)
    pairs = read_pairs("eng-fra").pairs
    sources = sorted({p.src for p in pairs})[:translations]
    first: dict[str, str] = {}
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
