"""`tinylm eval winrate`'s KL to the reference: exactly 0 for a run against itself, positive
for a changed policy, and the reference found through the PPO/DPO runs' configs; its sampled
evaluation: N seeded answers per prompt per side, pair j against pair j, an error over prompts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tinylm
from tinylm import rundir
from tinylm.cli import main
from tinylm.eval import winrate as wr
from tinylm.eval.winrate import answers, judged, mean_kl, reference_of, win_rate_se, winrate
from tinylm.feedback.collect import PromptRow, read_prompts

from ..feedback.tiny import story_rows, tiny_chat_run, write_rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """(a tiny chat run, the same run with its weights shifted: another policy)."""
    base = tmp_path_factory.mktemp("kl")
    a = tiny_chat_run(base / "a")
    model, tok = tinylm.load(a, family="gpt")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    b = base / "b"
    b.mkdir()
    rundir.save_model(b, model)
    rundir.save_tokenizers(b, tok)
    rundir.save_chat_template(b, rundir.chat_template(a, required=True))
    return a, b


@pytest.fixture
def prompts(tmp_path) -> Path:
    return write_rows(tmp_path / "p.jsonl", story_rows()[:3])


def test_kl_of_a_run_to_itself_is_zero(runs, prompts):
    rows = read_prompts(prompts)
    assert mean_kl(runs[0], runs[0], rows, samples=2, max_new_tokens=12) == 0.0


def test_kl_of_a_changed_policy_is_positive(runs, prompts):
    rows = read_prompts(prompts)
    kl = mean_kl(runs[1], runs[0], rows, samples=4, max_new_tokens=16)
    assert kl > 0.5  # k1 per answer: noisy per sample, clearly positive in the mean


def test_winrate_reports_the_kl_and_further_judges(runs, prompts, capsys):
    assert main(["eval", "winrate", "--a", str(runs[1]), "--b", str(runs[0]), "--judge",
                 "request", "--prompts", str(prompts), "--max-new-tokens", "12",
                 "--also", "textblob"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ref"] == str(runs[0])  # b: runs[1] has no PPO/DPO config naming its reference
    assert r["kl"] > 0 and r["kl_samples"] == 2 * 3
    assert set(r["also"]["textblob"]) >= {"win", "tie", "loss", "score_a", "score_b"}
    same = winrate(runs[0], runs[0], "request", prompts, max_new_tokens=12)
    assert same["kl"] == 0.0 and same["tie"] == 3


def test_the_reference_is_followed_back_through_ppo_and_dpo_runs(tmp_path):
    def run(name: str, toml: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / "config.toml").write_text(toml)
        return d

    sft = run("sft", 'init = "runs/pretrain"\n[data]\npath = "chat.jsonl"\n')
    r1 = run("ppo1", f'init = "{sft}"\nreward = "rm"\n[ppo]\nk = 4\n')
    r2 = run("dpo2", f'init = "{r1}"\nbeta = 0.1\n')
    assert reference_of(r2, "B") == str(sft)
    assert reference_of(sft, "B") == "B"  # an SFT run is no policy tuned against a reference
    r3 = run("ppo3", f'init = "{r1}"\nref = "{sft}"\nreward = "rm"\n[ppo]\nk = 4\n')
    assert reference_of(r3, "B") == str(sft)


def test_a_reference_with_another_tokenizer_is_a_one_line_error(runs, prompts, tmp_path,
                                                               capsys, error_of):
    from tinylm.tokenizer import train_char

    other = tmp_path / "other"
    other.mkdir()
    model, _ = tinylm.load(runs[0], family="gpt")
    rundir.save_model(other, model)
    rundir.save_tokenizers(other, train_char("xyz abc"))
    assert "another tokenizer" in error_of(
        ["eval", "winrate", "--a", str(runs[0]), "--b", str(runs[0]), "--ref", str(other),
         "--prompts", str(prompts), "--max-new-tokens", "8"], capsys)


# --- sampled evaluation: --temperature T --samples N --------------------------------------------
def test_sampled_answers_are_prompt_major_and_seeded_per_answer(runs, prompts):
    rows = read_prompts(prompts)
    got = answers(runs[0], rows, max_new_tokens=12, temperature=1.0, seed=5, samples=3)
    assert len(got) == 3 * len(rows)
    assert len(set(got)) > 1  # samples of a noisy tiny model differ
    # row i's j-th answer is the one seeded 5 + 3i + j, whatever else is in the batch
    for i, j in [(0, 0), (1, 2), (2, 1)]:
        alone = answers(runs[0], [rows[i]], max_new_tokens=12, temperature=1.0,
                        seed=5 + 3 * i + j)
        assert alone == [got[3 * i + j]]


def test_the_two_sides_sample_with_seeds_that_never_overlap(runs, prompts, monkeypatch):
    calls = []
    real = wr.answers

    def spy(run, rows, max_new_tokens, temperature, seed, samples):
        calls.append((seed, samples, len(rows)))
        return real(run, rows, max_new_tokens, temperature, seed, samples=samples)

    monkeypatch.setattr(wr, "answers", spy)
    r = winrate(runs[0], runs[0], "request", prompts, max_new_tokens=12, temperature=1.0,
                samples=4, seed=7, kl_samples=0)
    assert calls == [(7, 4, 3), (7 + 12, 4, 3)]  # A: seeds 7..18, B: 19..30
    assert (r["pairs"], r["samples"], r["temperature"]) == (12, 4, 1.0)
    assert r["win"] + r["tie"] + r["loss"] == 12 and r["win_rate_se"] >= 0
    assert r["length_a"] != r["length_b"]  # independent draws of one run, not copies


def test_the_cli_judges_sampled_pairs_with_the_kl(runs, prompts, capsys):
    assert main(["eval", "winrate", "--a", str(runs[1]), "--b", str(runs[0]), "--judge",
                 "request", "--prompts", str(prompts), "--max-new-tokens", "12",
                 "--temperature", "1", "--samples", "3", "--also", "textblob"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prompts"] == 3 and r["pairs"] == 9 and r["win"] + r["tie"] + r["loss"] == 9
    assert r["also"]["textblob"]["win"] + r["also"]["textblob"]["tie"] <= 9
    assert r["kl"] > 0 and r["win_rate_se"] >= 0


def story_prompts(pairs: list[tuple[str, str]]) -> list[PromptRow]:
    """The story requests for these (name, object) pairs, as read_prompts returns them."""
    rows = [r for r in story_rows() if (r["name"], r["object"]) in pairs]
    return [PromptRow(r["messages"][:1], {k: v for k, v in r.items() if k != "messages"})
            for r in rows]


def test_judged_scores_each_sample_against_its_own_prompt():
    rows = story_prompts([("Lily", "ball"), ("Tom", "kite")])
    good = [f"{n} had a {o}. {n} liked the {o} very much and played with it all day long in "
            f"the sun with friends." for n, o in (("Lily", "ball"), ("Tom", "kite"))]
    # A answers each prompt's own request twice; B answers each with the other prompt's
    texts = {"a": [good[0], good[0], good[1], good[1]], "b": [good[1], good[1], good[0], good[0]]}
    r = judged(texts, rows, "request", samples=2)
    assert (r["win"], r["tie"], r["loss"]) == (4, 0, 0) and r["score_a"] == 5.0
    assert r["ceiling"] == 1.0  # no B answer names its own prompt's character and object
    assert "ceiling" not in judged(texts, rows, "textblob", samples=2)  # no top mark


def test_the_ceiling_is_what_a_perfect_answer_wins_against_b():
    # against 5, 4.5, 3, 5: two wins and two ties (4.5 is under the top at resolution 0.5)
    assert wr.ceiling([5.0, 4.5, 3.0, 5.0], 5.0, 0.5) == 0.75
    assert wr.ceiling([4.9], 5.0, 0.5) == 0.5  # 4.9 rounds to the top mark: a tie


def test_the_win_rate_standard_error_is_over_prompts():
    # prompt 1 wins both its pairs, prompt 2 loses both: per-prompt rates 1 and 0
    assert win_rate_se([5, 5, 1, 1], [4, 4, 2, 2], 0.5, samples=2) == pytest.approx(0.5)
    assert win_rate_se([5, 1, 5, 1], [4, 2, 4, 2], 0.5, samples=2) == 0.0
    assert math.isnan(win_rate_se([5, 1], [4, 2], 0.5, samples=2))


@pytest.mark.parametrize("flags, message", [
    (["--samples", "2"], "needs --temperature > 0"),
    (["--temperature", "1", "--samples", "0"], "must be >= 1"),
    (["--temperature", "-1"], "must be >= 0"),
])
def test_bad_sampling_settings_are_one_line_errors(runs, prompts, capsys, error_of, flags,
                                                  message):
    assert message in error_of(["eval", "winrate", "--a", str(runs[0]), "--b", str(runs[0]),
                                "--prompts", str(prompts), *flags], capsys)
