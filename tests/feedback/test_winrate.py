"""`tinylm eval winrate`: two runs' answers to the same prompts, judged one by one."""

from __future__ import annotations

import json

import pytest

from tinylm.cli import main
from tinylm.eval.winrate import compare, winrate

from .tiny import story_rows, tiny_chat_run, write_rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("winrate")
    return tiny_chat_run(base / "a"), tiny_chat_run(base / "b")


def test_compare_counts_wins_ties_and_losses():
    assert compare([5, 4, 4.1, 1], [4, 4, 4.0, 2], 0.5) == {
        "win": 1, "tie": 2, "loss": 1, "win_rate": 0.5}
    assert compare([1.0, 0.2], [0.0, 0.1], 0.0)["win"] == 2


def test_a_run_against_itself_ties_every_prompt(runs, tmp_path):
    prompts = write_rows(tmp_path / "p.jsonl", story_rows()[:4])
    r = winrate(runs[0], runs[0], "request", prompts, max_new_tokens=16)
    assert (r["win"], r["tie"], r["loss"], r["win_rate"]) == (0, 4, 0, 0.5)
    assert r["score_a"] == r["score_b"] and r["length_a"] > 0


def test_the_cli_judges_by_sentiment(runs, tmp_path, capsys):
    prompts = write_rows(tmp_path / "p.jsonl", [{"prompt": "Once upon a time"}] * 1
                         + [{"prompt": "The dog"}])
    assert main(["eval", "winrate", "--a", str(runs[0]), "--b", str(runs[1]), "--judge",
                 "sentiment", "--prompts", str(prompts), "--max-new-tokens", "12"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prompts"] == 2 and r["win"] + r["tie"] + r["loss"] == 2


def test_an_unknown_judge_is_a_one_line_error(runs, tmp_path, capsys, error_of):
    assert "unknown labeler 'best'" in error_of(
        ["eval", "winrate", "--a", str(runs[0]), "--b", str(runs[1]), "--judge", "best"],
        capsys)
