"""`tinylm dpo`: DPO on every ordered pair of the rankings, against the frozen init run."""

from __future__ import annotations

import json
import math

import pytest
import torch

import tinylm
from tinylm import config as configlib
from tinylm import rundir
from tinylm.cli import main
from tinylm.feedback.io import read_rankings
from tinylm.feedback.preferences import PairData, sequence_logprobs, split_rows
from tinylm.stages import dpo

from ..feedback.tiny import tiny_chat_run, write_rows
from .test_reward import rankings


@pytest.fixture(scope="module")
def init_run(tmp_path_factory):
    return tiny_chat_run(tmp_path_factory.mktemp("dpo") / "chat")


@pytest.fixture
def data(tmp_path):
    return write_rows(tmp_path / "rankings.jsonl", rankings())


def dpo_cfg(init, data, out, *extra):
    return configlib.load(dpo.DPOConfig, "dpo-tinystories", [
        f"init='{init}'", f"data.path='{data}'", f"out='{out}'", "data.val_fraction=0.25",
        "train.steps=30", "train.batch_size=6", "train.progress=false", "train.eval_every=0",
        "train.dtype='float32'", "train.lr=3e-3", "train.muon_lr=0.02", "beta=0.5", *extra])


def test_held_out_loss_starts_at_log_2(init_run, data):
    model, tok = tinylm.load(init_run)
    _, held = split_rows(read_rankings(data), 0.25, 0)
    pairs = PairData(held, tok, rundir.chat_template(init_run), model.config.block_size)
    pairs.set_reference(model)
    with torch.no_grad():
        m = dpo.dpo_metrics(model, pairs, 4, beta=0.5)
    assert len(pairs) == 9 and m["val_loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_a_batch_by_ranking_forwards_each_distinct_answer_once(init_run, data):
    """B pairs drawn ranking by ranking: 7 pairs of 3-answer rankings (3 pairs each) are two
    whole rankings and one pair of a third, 8 rows where independent pairs take 14, and every
    pair's rows are its ranking's better and worse answers."""
    model, tok = tinylm.load(init_run, family="gpt")
    rows = read_rankings(data)
    pairs = PairData(rows, tok, rundir.chat_template(init_run), model.config.block_size)
    pairs.set_reference(model)
    x, y, ref, chosen, rejected, packed = pairs.batch(7, torch.Generator().manual_seed(0),
                                                      True)
    assert len(chosen) == len(rejected) == 7 and x.shape[0] == 3 + 3 + 2
    texts = [tok.decode(y[r][y[r] != -100].tolist(), skip_special=True) for r in range(len(x))]
    assert len(set(texts)) == len(texts)  # each answer once
    by_text = {(row.answers[i], row.answers[j]) for row in rows for i, j in row.pairs()}
    assert {(texts[c], texts[r]) for c, r in zip(chosen.tolist(), rejected.tolist())} <= by_text
    with torch.no_grad():  # the reference of a row is that answer's, wherever it was computed
        want = sequence_logprobs(model, x, y)
        got = sequence_logprobs(model, x, y, packed=packed)  # each ranking's prompt once
    assert torch.allclose(ref, want, atol=1e-4)
    assert torch.allclose(got, want, atol=1e-4)
    assert packed.tokens < int((x != pairs.pad_id).sum())  # the prompts were shared
    x, y, ref, chosen, rejected, _ = pairs.batch(30, torch.Generator().manual_seed(0))
    texts = [tok.decode(y[r][y[r] != -100].tolist(), skip_special=True) for r in range(len(x))]
    assert len(chosen) == 30 and len(set(texts)) == len(texts) == len(x) < 60  # independent
    assert {(texts[c], texts[r]) for c, r in zip(chosen.tolist(), rejected.tolist())} <= by_text


def test_dpo_prefers_the_chosen_answers_of_held_out_prompts(init_run, data, tmp_path):
    result = dpo.run(dpo_cfg(init_run, data, tmp_path / "dpo"))
    assert result["val_loss"] < math.log(2) - 0.1, result
    assert result["val_accuracy"] >= 0.8 and result["val_margin"] > 0
    model, _ = tinylm.load(tmp_path / "dpo", family="gpt")  # a plain chat model again
    assert (tmp_path / "dpo" / "chat_template.jinja").is_file()


def test_an_explicit_ref_is_the_reference_not_init(init_run, data, tmp_path):
    """With lr 0 the policy stays at init, so the held-out loss is log 2 against itself and
    lower against the original run when init is a DPO-trained policy (it prefers the chosen
    answers more than that run does)."""
    trained = tmp_path / "dpo"
    dpo.run(dpo_cfg(init_run, data, trained))
    frozen = ["train.steps=1", "train.lr=0.0", "train.muon_lr=0.0", "keep_best=false"]
    alone = dpo.run(dpo_cfg(trained, data, tmp_path / "self", *frozen))
    against_sft = dpo.run(dpo_cfg(trained, data, tmp_path / "ref", *frozen,
                                  f"ref='{init_run}'"))
    assert alone["val_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert against_sft["val_loss"] < math.log(2) - 0.1


def test_keep_best_saves_the_evaluation_with_the_lowest_held_out_loss(init_run, data,
                                                                     tmp_path):
    out = tmp_path / "dpo"
    result = dpo.run(dpo_cfg(init_run, data, out, "train.eval_every=5", "train.lr=1e-2",
                             "train.muon_lr=0.05"))  # a large LR: the loss does not only fall
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(losses) == 6 and result["val_loss"] == min(losses)
    assert result["best_step"] == 5 * (losses.index(min(losses)) + 1)
    model, tok = tinylm.load(out, family="gpt")
    _, held = split_rows(read_rankings(data), 0.25, 0)
    pairs = PairData(held, tok, rundir.chat_template(out), model.config.block_size)
    pairs.set_reference(tinylm.load(init_run, family="gpt")[0])
    with torch.no_grad():  # the saved weights are the best evaluation's
        assert dpo.dpo_metrics(model, pairs, 4, beta=0.5)["val_loss"] == pytest.approx(
            min(losses), abs=1e-5)


def test_the_cli_runs_dpo(init_run, data, tmp_path, capsys):
    assert main(["dpo", "--init", str(init_run), "--data", str(data), "--out",
                 str(tmp_path / "d"), "--set", "train.steps=2", "--set",
                 "train.progress=false", "--set", "data.val_fraction=0.25", "--set",
                 "by_ranking=true"]) == 0
    assert "training with DPO into" in capsys.readouterr().out


def test_dpo_bad_input_is_a_one_line_error(init_run, data, tmp_path, capsys, error_of):
    assert "beta=0.0 must be > 0" in error_of(
        ["dpo", "--init", str(init_run), "--data", str(data), "--set", "beta=0.0",
         "--out", str(tmp_path / "x")], capsys)
    assert "pass --data FILE" in error_of(
        ["dpo", "--init", str(init_run), "--set", "data.path=''", "--out",
         str(tmp_path / "y")], capsys)
