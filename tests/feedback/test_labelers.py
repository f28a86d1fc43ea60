"""Guideline labelers: the request labeler's graded checks and ties; sentiment by VADER and
TextBlob."""

from __future__ import annotations

import pytest

from tinylm.errors import UserError
from tinylm.feedback import guidelines, labelers

ROW = {"messages": [{"role": "user",
                     "content": "Tell me a story about a girl named Lily and a ball."}]}
GOOD = ("Once upon a time, there was a girl named Lily who had a ball. She liked to throw it "
        "in the park with her dog. One day the ball rolled away, and Lily ran after it. She "
        "found it under a tree and smiled.")


def test_request_score_counts_each_guideline():
    lab = labelers.get("request")
    assert lab.score(GOOD, ROW) == 5
    assert lab.score(GOOD.replace("Lily", "Sue"), ROW) == 4  # the wrong character
    assert lab.score(GOOD.replace("ball", "kite"), ROW) == 4  # the wrong object
    assert lab.score(GOOD[:-1] + " and", ROW) == 4  # an unfinished ending
    looped = GOOD + " She found it under a tree and smiled."
    assert guidelines.repeats_a_sentence(looped) and lab.score(looped, ROW) == 4
    assert lab.score("Lily had a ball.", ROW) == 4.5  # 4 words: short, within half the range
    assert lab.score("Lily had a ball.", ROW) < lab.score(GOOD, ROW)


def test_request_labeler_reads_make_chat_fields_before_the_text():
    row = {"name": "Tom", "object": "kite", "messages": ROW["messages"]}
    assert labelers.request_target(row) == ("Tom", "kite")
    assert labelers.request_target(ROW) == ("Lily", "ball")
    with pytest.raises(UserError, match="needs story requests"):
        labelers.request_target({"messages": [{"role": "user", "content": "Hi!"}]})


def test_follows_request_keeps_its_meaning():
    assert guidelines.follows_request(GOOD, "Lily", "ball")
    assert not guidelines.follows_request(GOOD, "Lily", "kite")


def test_rank_puts_equal_scores_in_one_tier():
    lab = labelers.get("request")
    answers = [GOOD.replace("Lily", "Sue"), GOOD, GOOD.replace("ball", "kite"), "No."]
    assert lab.rank(answers, ROW) == [[1], [0, 2], [3]]


def test_sentiment_prefers_happy_stories_and_textblob_agrees():
    happy = "Lily was so happy. She loved her ball and smiled with joy all day."
    sad = "Lily was sad. Her ball was broken and she cried. It was a bad, awful day."
    for name in ("sentiment", "textblob"):
        lab = labelers.get(name)
        assert lab.score(happy) > 0 > lab.score(sad)
        assert lab.rank([sad, happy]) == [[1], [0]]


def test_unknown_labeler_is_a_user_error():
    with pytest.raises(UserError, match="unknown labeler 'web2'"):
        labelers.get("web2")
