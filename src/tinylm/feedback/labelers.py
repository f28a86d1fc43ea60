"""Guideline labelers: automatic stand-ins for people that rank K answers to a prompt by the
written guidelines of docs/rlhf.md.

    labeler = get("request")
    tiers = labeler.rank(answers, prompt_row)   # [[2], [0, 3], [1]]: indices, best first

- `request` (the default; fits make-chat's story requests): one point each for naming the
  requested character, naming the requested object, ending with a finished sentence, and
  repeating no sentence, plus up to one for a length within range (guidelines.py): a score
  from 0 to 5 in steps of 0.5, so answers that meet the guidelines equally well tie.
- `sentiment`: happier stories, VADER's compound score (-1..1; the `vaderSentiment` package),
  the reward of TRL's classic IMDb-sentiment PPO example. Scores within 0.05 tie.
- `textblob`: TextBlob's polarity (-1..1), a second, held-out judge of sentiment: nothing is
  trained on it, so a gain it agrees with is not an artefact of VADER's lexicon.

A labeler's score is ground truth for evaluation only: a policy never sees it, only the
reward model trained on the rankings it makes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

from tinylm.errors import UserError
from tinylm.feedback import guidelines as g


@dataclass(frozen=True)
class Labeler:
    name: str
    score_fn: Callable[[str, dict], float]  # (answer, prompt row) -> score, higher = better
    resolution: float  # scores are rounded to multiples of this; equal ones tie
    doc: str
    top: float | None = None  # the score of an answer that meets every guideline, if any

    def can_judge(self, row: dict) -> bool:
        """Whether this labeler can score answers to the prompt `row` (the request labeler
        needs a story request; make-chat's translation rows are not)."""
        if self.name != "request":
            return True
        if row.get("task") not in (None, "story"):
            return False
        try:
            request_target(row)
        except UserError:
            return False
        return True

    def score(self, answer: str, row: dict | None = None) -> float:
        return self.score_fn(answer, row or {})

    def scores(self, answers: list[str], row: dict | None = None) -> list[float]:
        return [self.score(a, row) for a in answers]

    def rank(self, answers: list[str], row: dict | None = None) -> list[list[int]]:
        """Indices of `answers` in tiers, best first; answers whose rounded scores are equal
        share a tier."""
        return tiers_from_scores(self.scores(answers, row), self.resolution)


def tiers_from_scores(scores: list[float], resolution: float) -> list[list[int]]:
    keys = [round(s / resolution) for s in scores]
    return [[i for i, k in enumerate(keys) if k == level]
            for level in sorted(set(keys), reverse=True)]


# -- request ----------------------------------------------------------------------------------
def request_target(row: dict) -> tuple[str, str]:
    """(name, object) the prompt asks for: the make-chat row's fields, else parsed from the
    last user message."""
    if row.get("name") and row.get("object"):
        return row["name"], row["object"]
    users = [m["content"] for m in row.get("messages", []) if m.get("role") == "user"]
    found = g.parse_request(users[-1]) if users else None
    if found is None:
        raise UserError("the request labeler needs story requests (\"Tell me a story about a "
                        "girl named Lily and a ball.\") or rows with name and object fields; "
                        "use --labeler sentiment for other prompts")
    return found


def request_score(answer: str, row: dict) -> float:
    """0..5: character, object, finished ending, no repeated sentence (1 each) + length."""
    name, obj = request_target(row)
    return (g.names_character(answer, name) + g.names_object(answer, obj)
            + g.ends_finished(answer) + (not g.repeats_a_sentence(answer))
            + g.length_score(answer))


# -- sentiment --------------------------------------------------------------------------------
@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_score(answer: str, row: dict | None = None) -> float:
    return float(_vader().polarity_scores(answer)["compound"])


def textblob_score(answer: str, row: dict | None = None) -> float:
    from textblob import TextBlob

    polarity = float(TextBlob(answer).sentiment.polarity)
    return 0.0 if math.isnan(polarity) else polarity


LABELERS: dict[str, Labeler] = {lab.name: lab for lab in [
    Labeler("request", request_score, 0.5, "names the requested character and object, ends "
            "with a finished sentence, repeats no sentence, 20-80 words", top=5.0),
    Labeler("sentiment", vader_score, 0.05, "happier stories (VADER compound score)"),
    Labeler("textblob", textblob_score, 0.05, "happier stories (TextBlob polarity; the "
            "held-out judge)"),
]}


def get(name: str) -> Labeler:
    if name not in LABELERS:
        raise UserError(f"unknown labeler {name!r}; use one of {', '.join(LABELERS)}")
    return LABELERS[name]
