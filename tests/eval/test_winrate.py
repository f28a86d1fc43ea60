"""`tinylm eval winrate`'s KL to the reference: exactly 0 for a run against itself, positive
for a changed policy, and the reference found through the PPO/DPO runs' configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tinylm
from tinylm import rundir
from tinylm.cli import main
from tinylm.eval.winrate import mean_kl, reference_of, winrate
from tinylm.feedback.collect import read_prompts

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
