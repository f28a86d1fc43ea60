"""`tinylm feedback collect | export | import`: sample through the engine, label, store; the
rankings and TRL pairs files."""

from __future__ import annotations

import json

import pytest

from tinylm.cli import main
from tinylm.feedback import io, labelers
from tinylm.feedback.collect import CollectConfig, collect, read_prompts, relabel
from tinylm.feedback.store import Answer, Comparison, Ranking, Store

from .tiny import story_rows, tiny_chat_run, write_rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_chat_run(tmp_path_factory.mktemp("collect") / "chat")


@pytest.fixture
def prompts(tmp_path):
    rows = story_rows()[:5] + [{"messages": [{"role": "user", "content": "Translate: hi"},
                                             {"role": "assistant", "content": "salut"}],
                                "task": "translate"}]
    return write_rows(tmp_path / "prompts.jsonl", rows)


def test_collect_samples_k_answers_ranks_them_and_records_where_they_came_from(run, prompts,
                                                                               tmp_path):
    db = tmp_path / "fb.db"
    counts = collect(run, prompts, k=3, labeler="request", db=db,
                     cfg=CollectConfig(max_new_tokens=20, seed=3, round=1))
    assert counts == {"prompts": 5, "comparisons": 5, "rankings": 5, "skipped": 0}
    store = Store(db)
    assert store.count(Comparison) == 5 and store.count(Answer) == 15
    for rc in store.ranked_comparisons():
        assert len(set(rc.answers)) == 3 and rc.labelers == ["request"]
        assert rc.policy == str(run) and rc.round == 1 and rc.meta["task"] == "story"
        assert [m["role"] for m in rc.messages] == ["user"]  # the answer is not the prompt
    (r, *_) = store.rankings()
    assert r.round == 1 and r.policy == str(run)
    with store.session() as s:
        a = s.get(Answer, 1)
        assert a.sampling["temperature"] == 1.0 and a.sampling["seed"] == 3


def test_collect_is_reproducible(run, prompts, tmp_path):
    for name in ("a", "b"):
        collect(run, prompts, k=2, db=tmp_path / f"{name}.db", limit=2,
                cfg=CollectConfig(max_new_tokens=12, seed=5))
    answers = [[r.answers for r in Store(tmp_path / f"{n}.db").ranked_comparisons()]
               for n in ("a", "b")]
    assert answers[0] == answers[1]


def test_sentiment_labeler_takes_any_prompt(run, tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "Once upon a time"},
                                             {"prompt": "The dog was"}])
    assert collect(run, path, k=2, labeler="sentiment", db=tmp_path / "fb.db",
                   cfg=CollectConfig(max_new_tokens=10))["comparisons"] == 2


def test_export_import_round_trip_and_trl_pairs(run, prompts, tmp_path):
    db = tmp_path / "fb.db"
    collect(run, prompts, k=4, db=db, cfg=CollectConfig(max_new_tokens=20))
    out = tmp_path / "rankings.jsonl"
    assert io.export(Store(db), out) == 5
    rows = io.read_rankings(out)
    line = json.loads(out.read_text().splitlines()[0])
    assert line["labelers"] == ["request"] and line["name"] and len(line["answers"]) == 4
    pairs = tmp_path / "pairs.jsonl"
    n_pairs = io.export(Store(db), pairs, "pairs")
    assert n_pairs == sum(len(r.pairs()) for r in rows)
    p = json.loads(pairs.read_text().splitlines()[0])
    assert set(p) == {"prompt", "chosen", "rejected"}
    assert p["chosen"][0]["role"] == "assistant" and p["prompt"][0]["role"] == "user"
    other = Store(tmp_path / "other.db")
    assert io.import_file(other, out) == 5
    assert io.import_file(other, out) == 0  # the same file twice stores each ranking once
    back = [(r.answers, r.ranks) for r in io.read_rankings(out)]
    io.export(other, tmp_path / "again.jsonl")
    assert [(r.answers, r.ranks) for r in io.read_rankings(tmp_path / "again.jsonl")] == back
    assert io.import_file(other, pairs) == n_pairs and other.count(Ranking) == 5 + n_pairs


def test_the_cli_collects_and_exports(run, prompts, tmp_path, capsys):
    db = str(tmp_path / "fb.db")
    assert main(["feedback", "collect", "--run", str(run), "--prompts", str(prompts),
                 "--k", "2", "--db", db, "--max-new-tokens", "10"]) == 0
    assert "comparisons 5" in capsys.readouterr().out
    assert main(["feedback", "export", "--db", db, "--out", str(tmp_path / "p.jsonl"),
                 "--format", "pairs"]) == 0
    assert "pairs lines" in capsys.readouterr().out


def test_bad_input_is_a_one_line_error(run, prompts, tmp_path, capsys, error_of):
    db = str(tmp_path / "fb.db")
    base = ["feedback", "collect", "--run", str(run), "--db", db]
    assert "at least 2 answers" in error_of(base + ["--prompts", str(prompts), "--k", "1"],
                                            capsys)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert "no prompts" in error_of(base + ["--prompts", str(empty)], capsys)
    assert "no such prompts file" in error_of(base + ["--prompts", str(tmp_path / "x")],
                                              capsys)
    bad = write_rows(tmp_path / "bad.jsonl", [{"text": "hi"}])
    assert "bad.jsonl:1: expected an object" in error_of(base + ["--prompts", str(bad)],
                                                         capsys)
    assert "unknown labeler" in error_of(base + ["--prompts", str(prompts), "--labeler",
                                                 "nope"], capsys)
    dup = write_rows(tmp_path / "dup.jsonl", [{"messages": [{"role": "user", "content": "a"}],
                                               "answers": ["x", "x"], "ranks": [0, 1]}])
    assert "dup.jsonl:1: answers 1 and 2 are the same" in error_of(
        ["feedback", "import", "--db", db, "--file", str(dup)], capsys)


def test_read_prompts_takes_turns_before_the_first_answer(prompts):
    rows = read_prompts(prompts)
    assert len(rows) == 6 and rows[0].messages[-1]["role"] == "user"


def test_relabel_ranks_the_stored_answers_by_another_labeler_once(run, prompts, tmp_path):
    db = tmp_path / "fb.db"
    collect(run, prompts, k=3, labeler="request", db=db,
            cfg=CollectConfig(max_new_tokens=20, seed=3))
    assert relabel(db, "sentiment", "request")["rankings"] == 5
    relabel(db, "sentiment", "request")  # idempotent: the same keys store nothing new
    store = Store(db)
    assert store.count(Ranking) == 10 and store.count(Answer) == 15
    by_request = {rc.comparison_id: rc for rc in store.ranked_comparisons("request")}
    vader = labelers.get("sentiment")
    for rc in store.ranked_comparisons("sentiment"):
        assert rc.labelers == ["sentiment"] and rc.answers == by_request[rc.comparison_id].answers
        tiers = vader.rank(rc.answers)
        assert rc.ranks == [next(t for t, tier in enumerate(tiers) if i in tier)
                            for i in range(3)]
