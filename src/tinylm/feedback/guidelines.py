"""Written guidelines as code: the checks a guideline labeler applies to an answer.

`follows_request` is the rule the chat evaluation counts (eval/chat.py) and the `request`
labeler starts from: the story names the requested character and object and ends with a
finished sentence.
"""

from __future__ import annotations

import re


def follows_request(answer: str, name: str, obj: str) -> bool:
    answer = answer.strip()
    return (re.search(rf"\b{re.escape(name)}\b", answer) is not None
            and re.search(rf"\b{re.escape(obj)}s?\b", answer, re.IGNORECASE) is not None
            and answer.endswith((".", "!", "?", '"')))


# -- the `request` labeler's graded checks (feedback/labelers.py; docs/rlhf.md says them) ----
MIN_WORDS, MAX_WORDS = 20, 80  # the shipped story answers run 27-67 words
REQUEST = re.compile(r"named ([A-Z][\w'-]*) and (?:a|an|the) ([a-z]+)")
SENTENCE_SPLIT = re.compile(r"(?<=[.!?])[\"']?\s+")


def parse_request(request: str) -> tuple[str, str] | None:
    """(name, object) of a make-chat story request ("... a girl named Lily and a ball."), or
    None when the text is not one."""
    m = REQUEST.search(request)
    return (m.group(1), m.group(2)) if m else None


def names_character(answer: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", answer) is not None


def names_object(answer: str, obj: str) -> bool:
    return re.search(rf"\b{re.escape(obj)}s?\b", answer, re.IGNORECASE) is not None


def ends_finished(answer: str) -> bool:
    return answer.strip().endswith((".", "!", "?", '"'))


def repeats_a_sentence(answer: str) -> bool:
    """Two sentences with the same words (case and spacing aside): a model caught in a loop."""
    seen = set()
    for s in SENTENCE_SPLIT.split(answer.strip()):
        key = " ".join(s.lower().split())
        if key in seen and len(key.split()) >= 3:
            return True
        seen.add(key)
    return False


def length_score(answer: str, lo: int = MIN_WORDS, hi: int = MAX_WORDS) -> float:
    """1 inside [lo, hi] words, 0.5 within half that range beyond it, 0 further away."""
    n = len(answer.split())
    gap = max(lo - n, n - hi, 0)
    return 1.0 if gap == 0 else 0.5 if gap <= (hi - lo) / 2 else 0.0
